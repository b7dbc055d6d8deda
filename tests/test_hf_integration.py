"""xent_ext.integrations.transformers.apply on tiny random-init models of each family: the same
loss and gradients as the unpatched model through model(..., labels=...) and through a
2-step Trainer run (with and without label smoothing, with gradient accumulation)."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from xent_ext.integrations import transformers as xent_hf

tf = pytest.importorskip("transformers")

VOCAB, SEQ = 97, 12
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
              num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3,
              max_position_embeddings=64)


def _configs():
    return {
        "llama": lambda: tf.LlamaConfig(**COMMON),
        "mistral": lambda: tf.MistralConfig(**COMMON),
        "qwen2": lambda: tf.Qwen2Config(**COMMON),
        "qwen3": lambda: tf.Qwen3Config(**COMMON, head_dim=8),
        # A strong cap, so that a loss computed without it would differ.
        "gemma2": lambda: tf.Gemma2Config(**COMMON, head_dim=8, final_logit_softcapping=0.2),
        "gemma3": lambda: tf.Gemma3TextConfig(**COMMON, head_dim=8,
                                              final_logit_softcapping=0.2),
        "gpt2": lambda: tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4,
                                      n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_pdrop=0.0, initializer_range=0.3),
    }


FAMILIES = list(_configs())


def _model(family, seed=0):
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(_configs()[family]())
    return model.float().train()


def _batch(seed, batch=2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, SEQ), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100  # a prompt, not trained on
    return ids, labels


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6,
                                   msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("fused", [True, False], ids=["fused_linear", "logits"])
@pytest.mark.parametrize("family", FAMILIES)
def test_model_forward_loss_and_grads_match(family, fused):
    ref = _model(family)
    ours = xent_hf.apply(copy.deepcopy(ref), fused_linear=fused)
    ids, labels = _batch(seed=torch.seed() % 2**31)
    for kwargs in ({}, {"num_items_in_batch": torch.tensor(13)}):
        ref.zero_grad(), ours.zero_grad()
        want = ref(input_ids=ids, labels=labels, **kwargs)
        got = ours(input_ids=ids, labels=labels, **kwargs)
        torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
        assert got.loss.dtype == want.loss.dtype == torch.float32
        assert (got.logits is None) == fused  # training: no logits on the fused path
        want.loss.backward()
        got.loss.backward()
        _assert_same(_grads(ours), _grads(ref))


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_eval_returns_logits_and_the_same_loss(family):
    ref = _model(family).eval()
    ours = xent_hf.apply(copy.deepcopy(ref)).eval()
    ids, labels = _batch(seed=3)
    with torch.no_grad():
        want, got = ref(input_ids=ids, labels=labels), ours(input_ids=ids, labels=labels)
    torch.testing.assert_close(got.logits, want.logits)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)


def test_softcap_comes_from_the_config():
    model = xent_hf.apply(_model("gemma2"))
    assert model._xent_ext_fused["softcap"] == 0.2
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        xent_hf.apply(_model("gemma2"), softcap=5.0)


def test_options_reach_the_loss():
    ref = _model("llama")
    ours = xent_hf.apply(copy.deepcopy(ref), z_loss=1e-2, label_smoothing=0.1)
    ids, labels = _batch(seed=4)
    got = ours(input_ids=ids, labels=labels).loss
    logits = ref(input_ids=ids).logits
    target = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), target.reshape(-1),
                                             label_smoothing=0.1)
    lse = torch.logsumexp(logits.reshape(-1, VOCAB), -1)[target.reshape(-1) != -100]
    torch.testing.assert_close(got, want + 1e-2 * (lse ** 2).mean(), rtol=1e-5, atol=1e-6)


def test_bad_arguments():
    with pytest.raises(TypeError, match="unexpected keyword argument 'inplace_backward'"):
        xent_hf.apply(_model("llama"), inplace_backward=True)
    with pytest.raises(ValueError, match="z_loss"):
        xent_hf.apply(_model("llama"), z_loss=-1.0)
    with pytest.raises(TypeError, match="causal-LM"):
        xent_hf.apply(torch.nn.Linear(2, 2))


def test_return_dict_false_and_labels_as_positional():
    ref = _model("llama")
    ours = xent_hf.apply(copy.deepcopy(ref))
    ids, labels = _batch(seed=5)
    want = ref(ids, None, None, None, None, labels).loss
    got = ours(ids, None, None, None, None, labels, return_dict=False)
    torch.testing.assert_close(got[0], want)


def _train(model, tmp_path, smoothing, steps=2):
    data = []
    for i in range(steps * 4):
        ids, labels = _batch(seed=100 + i, batch=1)
        data.append({"input_ids": ids[0], "labels": labels[0]})
    # SGD: Adam divides by the gradients' own size, which turns rounding differences in tiny
    # gradients into different steps.  Gradient accumulation: num_items_in_batch is passed.
    args = tf.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2,
                                gradient_accumulation_steps=2, max_steps=steps, optim="sgd",
                                learning_rate=0.1, logging_steps=1, report_to="none",
                                use_cpu=True, save_strategy="no", seed=0, disable_tqdm=True,
                                label_smoothing_factor=smoothing, dataloader_num_workers=0)
    trainer = tf.Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return trainer, losses


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_trainer_two_steps_match(family, smoothing, tmp_path):
    ref = _model(family)
    ours = xent_hf.apply(copy.deepcopy(ref))
    xent_smoother = xent_hf.install_label_smoother()
    import transformers.trainer as trainer_module
    import transformers.trainer_pt_utils as pt_utils

    original = xent_smoother.__mro__[1]
    trainer_module.LabelSmoother = pt_utils.LabelSmoother = original  # the reference run
    try:
        _, want = _train(ref, tmp_path / "ref", smoothing)
    finally:
        xent_hf.install_label_smoother()
    trainer, got = _train(ours, tmp_path / "ours", smoothing)
    if smoothing:
        assert isinstance(trainer.label_smoother, xent_smoother)
    assert len(got) == len(want) == 2
    assert got == pytest.approx(want, rel=1e-5)
    for (name, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6,
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_importable_without_transformers():
    code = ("import sys; sys.modules['transformers'] = None\n"
            "from xent_ext.integrations import transformers as t\n"
            "try:\n    t.apply(None)\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert "needs the transformers package" in out


def test_training_loss_goes_through_the_fused_call(monkeypatch):
    import xent_ext

    seen = []
    real = xent_ext.linear_cross_entropy

    def spy(input, weight, target, bias=None, **options):
        seen.append((tuple(input.shape), options))
        return real(input, weight, target, bias, **options)

    monkeypatch.setattr(xent_ext, "linear_cross_entropy", spy)
    model = xent_hf.apply(_model("gemma3"), z_loss=1e-3)
    seen.clear()  # apply() checked the options' values with a call of its own
    ids, labels = _batch(seed=6)
    model(input_ids=ids, labels=labels).loss.backward()
    assert seen == [((2 * SEQ, 32), {"reduction": "mean", "ignore_index": -100,
                                     "z_loss": 1e-3, "softcap": 0.2})]
    model.eval()
    model(input_ids=ids, labels=labels)
    assert len(seen) == 1  # evaluation: the logits-level loss


def test_a_copy_of_an_applied_model_is_its_own():
    ref = _model("llama")
    ours = xent_hf.apply(copy.deepcopy(ref))
    twin = copy.deepcopy(ours)
    with torch.no_grad():
        twin.lm_head.weight.mul_(2.0)
    ids, labels = _batch(seed=7)
    twin(input_ids=ids, labels=labels).loss.backward()
    assert twin.lm_head.weight.grad is not None and ours.lm_head.weight.grad is None
    torch.testing.assert_close(ours(input_ids=ids, labels=labels).loss,
                               ref(input_ids=ids, labels=labels).loss)


def test_apply_again_replaces_the_mode():
    ref = _model("qwen2")
    ours = xent_hf.apply(xent_hf.apply(copy.deepcopy(ref)), fused_linear=False)
    ids, labels = _batch(seed=8)
    out = ours(input_ids=ids, labels=labels)
    assert out.logits is not None
    torch.testing.assert_close(out.loss, ref(input_ids=ids, labels=labels).loss)


def test_autocast_bfloat16_matches():
    ref = _model("llama")
    ours = xent_hf.apply(copy.deepcopy(ref))
    ids, labels = _batch(seed=9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = ref(input_ids=ids, labels=labels).loss
        got = ours(input_ids=ids, labels=labels).loss
    assert got.dtype == want.dtype == torch.float32
    # The logits in bfloat16 either way; the loss of bfloat16 logits differs by their rounding.
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    got.backward()
    want.backward()
    grads = {n: p.grad for n, p in ours.named_parameters()}
    for name, p in ref.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=5e-2, atol=5e-3,
                                   msg=lambda m, n=name: f"{n}: {m}")


class _LargestTensor(TorchDispatchMode):
    """The largest tensor any operator returns while in force."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_training_never_holds_the_logits(family):
    """No operator the model's training step runs returns a tensor the size of the logits
    (linear_cross_entropy's own chunk buffer is its business, tested with it)."""
    ids, labels = _batch(seed=10, batch=6)  # 72 rows: the logits are the largest tensor
    n_logits = ids.numel() * VOCAB
    with _LargestTensor() as seen:
        _model(family)(input_ids=ids, labels=labels).loss.backward()
    assert seen.largest >= n_logits  # the check sees them where they exist
    model = xent_hf.apply(_model(family), chunk_size=16)
    with _LargestTensor() as seen:
        model(input_ids=ids, labels=labels).loss.backward()
    assert seen.largest < n_logits


def test_chunk_options_only_on_the_fused_path():
    ref = _model("mistral")
    ours = xent_hf.apply(copy.deepcopy(ref), chunk_bytes=1 << 12)
    ids, labels = _batch(seed=11)
    torch.testing.assert_close(ours(input_ids=ids, labels=labels).loss,
                               ref(input_ids=ids, labels=labels).loss, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="only with fused_linear=True"):
        xent_hf.apply(_model("mistral"), fused_linear=False, chunk_size=8)
    with pytest.raises(ValueError, match="chunk_size"):
        xent_hf.apply(_model("mistral"), chunk_size=0)
