"""losskit.integrations.transformers on tiny randomly initialised models built from configs (no download).

Each check compares the patched model with an unpatched copy of itself: same loss, same gradients, same
Trainer run under gradient accumulation, identical inference; and a dispatch-mode probe shows that no
tensor of tokens x vocabulary elements is allocated in a patched training step.
"""

from __future__ import annotations

import copy
import importlib
import re
import sys

import pytest
import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from losskit.integrations.transformers import is_patched, patch, unpatch
from losskit.ops import linear_xent
from losskit.testing import assert_close

VOCAB = 512
SEQ = 64  # tokens = 2 * SEQ = 128 > hidden (32), so tokens x vocab is the largest tensor of a plain step
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=2 * SEQ)
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**_COMMON),
    "qwen2": lambda: transformers.Qwen2Config(**_COMMON),
    "mistral": lambda: transformers.MistralConfig(**_COMMON),
    "gemma": lambda: transformers.GemmaConfig(**_COMMON, head_dim=8),  # ties lm_head to the embeddings
    # final_logit_softcapping 3.0 bends the tiny model's logits (a few units) well into tanh's curve.
    "gemma2": lambda: transformers.Gemma2Config(**_COMMON, head_dim=8, final_logit_softcapping=3.0),
}


def _model(arch: str, dtype: torch.dtype = torch.float32) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(CONFIGS[arch]()).to(dtype)


def _batch(seed: int = 0, seq: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, seq), generator=g)
    labels = ids.clone()
    labels[0, : seq // 3] = -100  # a masked prompt
    labels[1, -2:] = -100  # right padding
    return ids, labels


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request):
    """(unpatched, patched) copies of one tiny model."""
    plain = _model(request.param)
    return plain, patch(copy.deepcopy(plain))


@pytest.mark.parametrize("loss_kwargs", [{}, {"num_items_in_batch": torch.tensor(9)}, {"num_items_in_batch": 5},
                                         {"ignore_index": 7}])
def test_loss_and_gradients_match(pair, loss_kwargs):
    plain, patched = pair
    ids, labels = _batch()
    if "ignore_index" in loss_kwargs:
        labels = labels.masked_fill(labels == -100, 7)
    outs = []
    for model in (plain, patched):
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=labels, **loss_kwargs)
        out.loss.backward()
        outs.append(out)
    assert outs[1].logits is None
    assert outs[1].loss.dtype == outs[0].loss.dtype == torch.float32
    assert_close(outs[1].loss, outs[0].loss)
    expected = _grads(plain)
    actual = _grads(patched)
    assert actual.keys() == expected.keys()
    for name in expected:
        assert_close(actual[name], expected[name], msg=name)


@pytest.mark.parametrize("chunk_size", [1, 5, 64])
def test_any_chunk_size_gives_the_same_loss_and_gradients(chunk_size):
    plain = _model("llama")
    patched = patch(copy.deepcopy(plain), chunk_size=chunk_size)
    ids, labels = _batch(seed=6)
    plain(input_ids=ids, labels=labels).loss.backward()
    out = patched(input_ids=ids, labels=labels)
    out.loss.backward()
    assert_close(out.loss, plain(input_ids=ids, labels=labels).loss)
    for (name, a), b in zip(plain.named_parameters(), patched.parameters()):
        assert_close(b.grad, a.grad, msg=name)


def test_given_shift_labels_are_used_as_they_are(pair):
    plain, patched = pair
    ids, labels = _batch(seed=1)
    shifted = labels.roll(-2, dims=1)  # any per-position targets: not shifted again
    with torch.no_grad():
        assert_close(patched(input_ids=ids, labels=labels, shift_labels=shifted).loss,
                     plain(input_ids=ids, labels=labels, shift_labels=shifted).loss)


def test_tuple_output_and_positional_input_ids(pair):
    plain, patched = pair
    ids, labels = _batch(seed=2)
    with torch.no_grad():
        out = patched(ids, labels=labels, return_dict=False, use_cache=True)
        ref = plain(ids, labels=labels, return_dict=False, use_cache=True)
    assert isinstance(out, tuple)
    assert_close(out[0], ref[0])  # the loss first, then what follows the logits (the cache)
    assert [type(v) for v in out[1:]] == [type(v) for v in ref[2:]]


def test_inference_and_generation_unchanged(pair):
    plain, patched = pair
    ids, _ = _batch(seed=3)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        assert torch.equal(patched(input_ids=ids, attention_mask=mask).logits,
                           plain(input_ids=ids, attention_mask=mask).logits)
    settings = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(patched.generate(ids, **settings), plain.generate(ids, **settings))


class _LargestTensor(TorchDispatchMode):
    """Records the most elements of any tensor an aten op returns (forward and backward alike)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_no_tokens_by_vocabulary_tensor_in_a_training_step(arch):
    ids, labels = _batch(seq=SEQ)
    tokens_by_vocab = ids.numel() * VOCAB
    sizes = {}
    # At this tiny size losskit's default memory budget would hold every token's logits in one chunk;
    # chunks of 32 of the 128 tokens stand in for a real model, whose logits are far above the budget.
    for name, model in (("plain", _model(arch)), ("patched", patch(_model(arch), chunk_size=32))):
        with _LargestTensor() as probe:
            model(input_ids=ids, labels=labels).loss.backward()
        sizes[name] = probe.largest
    assert sizes["plain"] >= tokens_by_vocab  # the probe sees the logits of an unpatched step
    assert sizes["patched"] < tokens_by_vocab


@pytest.mark.parametrize("native", [True, False], ids=["bfloat16 products", "float32 products"])
def test_bfloat16_model_within_eps_and_no_worse_than_transformers(native, monkeypatch):
    """A bfloat16 model, with linear_cross_entropy's products in bfloat16 (CPUs with AMX/AVX512-BF16) and
    in float32 (the others), whatever this CPU is. Against float64 from the same bfloat16 hidden states
    and head: the float32 loss within 1 bfloat16 eps (its logits are bfloat16 products at most) and the
    head's gradient within 2 eps normwise (a product of the bfloat16-rounded logits' gradient, rounded
    once: about one eps, as transformers'); each no worse than 2x transformers' own error + 0.05 eps, the
    factor of tests/functional/test_linear_cross_entropy.py (chunks there; here the default chunk holds
    the 24 tokens)."""
    monkeypatch.setattr(linear_xent, "cpu_multiplies_bfloat16", lambda: native)
    plain = _model("llama", torch.bfloat16)
    patched = patch(copy.deepcopy(plain))
    ids, labels = _batch(seed=4)
    with torch.no_grad():
        hidden = plain.model(input_ids=ids).last_hidden_state  # (2, 12, 32) bfloat16, as both models see it
    w64 = plain.lm_head.weight.detach().double().requires_grad_()
    logits64 = hidden.double() @ w64.T
    truth = torch.nn.functional.cross_entropy(logits64[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
    truth.backward()
    results = {}
    for name, model in (("ours", patched), ("transformers", plain)):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        assert loss.dtype == torch.float32 and model.lm_head.weight.grad.dtype == torch.bfloat16
        results[name] = (_bf16_eps(loss, truth), _bf16_eps(model.lm_head.weight.grad, w64.grad))
    (loss_err, grad_err), (loss_base, grad_base) = results["ours"], results["transformers"]
    assert loss_err <= 1 and grad_err <= 2, results
    assert loss_err <= 2 * loss_base + 0.05 and grad_err <= 2 * grad_base + 0.05, results


def _bf16_eps(actual: torch.Tensor, truth: torch.Tensor) -> float:
    """The largest error of ``actual`` against ``truth``, in bfloat16 eps of ``max |truth|`` (normwise)."""
    return ((actual.double() - truth).abs().max() / truth.abs().max()).item() / torch.finfo(torch.bfloat16).eps


def test_trainer_with_gradient_accumulation_matches_step_for_step(tmp_path):
    g = torch.Generator().manual_seed(5)
    data = []
    for i in range(12):
        ids = torch.randint(0, VOCAB, (10,), generator=g)
        labels = ids.clone()
        labels[: i % 7] = -100  # a different number of scored tokens per example
        data.append({"input_ids": ids, "labels": labels})
    seen = []

    def run(model):
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=3, max_steps=2,
            learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
            disable_tqdm=True, dataloader_num_workers=0,
            # SGD moves each parameter by lr * gradient, so float-rounding differences in the gradients stay
            # rounding-sized in the parameters; Adam's first steps are close to lr * sign(gradient) and turn
            # a 1e-8 difference in a near-zero gradient into a visible one.
            optim="sgd")
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
        trainer.train()
        return [(h["loss"], h["grad_norm"]) for h in trainer.state.log_history if "loss" in h], model

    plain_log, plain = run(_model("llama"))
    patched = patch(_model("llama"))
    patched.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("num_items_in_batch")), with_kwargs=True)
    patched_log, patched = run(patched)
    assert len(plain_log) == 2
    assert all(n is not None for n in seen)  # Trainer did pass the accumulation normaliser
    for (loss_a, norm_a), (loss_b, norm_b) in zip(plain_log, patched_log):
        assert loss_b == pytest.approx(loss_a, rel=1e-5)
        assert norm_b == pytest.approx(norm_a, rel=1e-4)
    for (name, a), b in zip(plain.named_parameters(), patched.parameters()):
        assert_close(b.detach(), a.detach(), msg=name)


def test_patch_unpatch_round_trip():
    model = _model("qwen2")
    assert patch(model) is model and is_patched(model)
    patch(model)  # a second patch is a no-op
    ids, labels = _batch()
    assert model(input_ids=ids, labels=labels).logits is None
    clone = copy.deepcopy(model)  # the patched forward rebinds to the copy
    assert is_patched(clone) and clone.forward.__self__ is clone
    assert unpatch(model) is model and not is_patched(model)
    assert "forward" not in model.__dict__
    assert model(input_ids=ids, labels=labels).logits.shape == (*ids.shape, VOCAB)
    unpatch(model)  # unpatching an unpatched model is a no-op


def test_unsupported_models_are_refused():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        patch(gpt2)
    with pytest.raises(TypeError, match="PreTrainedModel"):
        patch(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="chunk_size"):
        patch(_model("llama"), chunk_size=0)
    with pytest.raises(TypeError, match="chunk_size"):
        patch(_model("llama"), chunk_size=2.0)
    model = _model("llama")
    model.forward = model.forward  # what a device hook does: an instance-level forward
    with pytest.raises(ValueError, match="already replaced"):
        patch(model)


def test_missing_transformers_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # what `import transformers` meets when not installed
    monkeypatch.delitem(sys.modules, "losskit.integrations.transformers")
    with pytest.raises(ImportError, match=re.escape("pip install 'losskit[hf]'")):
        importlib.import_module("losskit.integrations.transformers")
