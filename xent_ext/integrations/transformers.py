"""Hugging Face causal language models train on xent_ext in one call.

    from xent_ext.integrations import transformers as xent_hf
    xent_hf.apply(model)                      # before creating the Trainer

In training mode, model(..., labels=...) then runs the base model, takes the hidden states
that would enter lm_head and computes the loss with xent_ext.linear_cross_entropy (lm_head's
weight and bias, the labels shifted as transformers shifts them, ignore_index=-100,
num_items_in_batch for gradient accumulation): the logits are never held whole, and none are
returned (output.logits is None).
In evaluation mode the model returns its logits as before and the loss comes from them, through
xent_ext's kernel.  Gemma 2 / 3's final_logit_softcapping becomes xent_ext's softcap.  The
Trainer's label smoother (label_smoothing_factor > 0) is swapped for one on xent_ext's kernel.

transformers is imported only when apply() is called: this module imports without it.
"""

from __future__ import annotations

import functools
import inspect
import threading
import types

import torch
import torch.nn.functional as F
from torch import nn

import xent_ext

# xent_ext.cross_entropy's options that apply() passes on.  inplace_backward is not among them:
# it would overwrite logits that the model also returns.
_OPTIONS = frozenset({"z_loss", "softcap", "logit_scale", "label_smoothing"})
# linear_cross_entropy's own, for the fused path only.
_FUSED_OPTIONS = frozenset({"chunk_size", "chunk_bytes"})

_capture = threading.local()


def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError("xent_ext.integrations.transformers needs the transformers package "
                          "(pip install transformers)") from e
    return transformers


def apply(model, *, fused_linear: bool = True, **options):
    """Makes a transformers causal-LM model compute its loss with xent_ext; returns the model.

    fused_linear=True: in training mode the loss comes from the hidden states through the
    fused linear + cross-entropy, and the logits are not returned; fused_linear=False: the
    model computes its logits as before and the loss runs on xent_ext's logits-level kernel.
    options: z_loss, softcap, logit_scale, label_smoothing, as xent_ext.cross_entropy takes
    them, and with fused_linear=True linear_cross_entropy's chunk_size or chunk_bytes (an
    unknown name raises TypeError).  Calling apply() again replaces the options.
    """
    tf = _transformers()
    allowed = _OPTIONS | (_FUSED_OPTIONS if fused_linear else frozenset())
    unknown = set(options) - allowed
    if unknown:
        name = sorted(unknown)[0]
        where = " (only with fused_linear=True)" if name in _FUSED_OPTIONS else ""
        raise TypeError(f"apply() got an unexpected keyword argument {name!r}{where} "
                        f"(options: {', '.join(sorted(allowed))})")
    _check_model(tf, model)
    with torch.no_grad():  # the values, checked once with the error each call would give
        target = torch.zeros(1, dtype=torch.long)
        xent_ext.linear_cross_entropy(torch.zeros(1, 2), torch.zeros(2, 2), target, **options)
    chunking = {k: v for k, v in options.items() if k in _FUSED_OPTIONS}
    options = {k: v for k, v in options.items() if k not in _FUSED_OPTIONS}

    config_cap = getattr(model.config, "final_logit_softcapping", None)
    fused_options = dict(options, **chunking)
    if config_cap is not None:
        if options.get("softcap") not in (None, config_cap):
            raise ValueError(f"apply(softcap={options['softcap']}): the model's config already "
                             f"caps its logits (final_logit_softcapping={config_cap})")
        fused_options["softcap"] = config_cap
        # The logits the model returns are capped already: the logits-level loss must not cap
        # them again.
        options = {k: v for k, v in options.items() if k != "softcap"}

    model.loss_function = functools.partial(causal_lm_loss, options=options)
    model._xent_ext_fused = fused_options if fused_linear else None
    head = model.get_output_embeddings()
    if fused_linear:
        head.forward = types.MethodType(_head_forward, head)
        model.forward = types.MethodType(_wrapped_forward(type(model)), model)
    else:
        head.__dict__.pop("forward", None)
        model.__dict__.pop("forward", None)
    install_label_smoother()
    return model


def _check_model(tf, model) -> None:
    causal_lm = set(tf.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if not isinstance(model, tf.PreTrainedModel) or type(model).__name__ not in causal_lm:
        raise TypeError("apply() takes a transformers causal-LM model (a *ForCausalLM or "
                        f"*LMHeadModel), got {type(model).__name__}")
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear:
        raise TypeError(f"apply(): {type(model).__name__}'s output layer is "
                        f"{type(head).__name__}, not an nn.Linear: not supported")


class _Slot:
    def __init__(self, head):
        self.head, self.hidden = head, None


def _head_forward(self, x):
    """lm_head's forward once apply() ran: while the wrapped model forward captures (this
    thread, this layer), hand the hidden states through instead of computing the logits."""
    slot = getattr(_capture, "slot", None)
    if slot is not None and slot.head is self and slot.hidden is None:
        slot.hidden = x
        return x
    return nn.Linear.forward(self, x)


_FORWARDS: dict[type, object] = {}


def _wrapped_forward(cls):
    """The model forward apply() installs (one per model class; the model's own options are
    read from the instance, so copies of the model keep working)."""
    if cls in _FORWARDS:
        return _FORWARDS[cls]
    plain = cls.forward
    sig = inspect.signature(plain)

    @functools.wraps(plain)  # the signature the Trainer inspects stays the model's
    def forward(self, *args, **kwargs):
        options = getattr(self, "_xent_ext_fused", None)
        bound = sig.bind(self, *args, **kwargs)
        labels = bound.arguments.get("labels")
        if options is None or labels is None or not self.training:
            return plain(self, *args, **kwargs)
        call = {}
        for name, value in list(bound.arguments.items())[1:]:
            if sig.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                call.update(value)
            else:
                call[name] = value
        call["labels"] = None
        head = self.get_output_embeddings()
        previous, _capture.slot = getattr(_capture, "slot", None), _Slot(head)
        try:
            out = plain(self, **call)
            hidden = _capture.slot.hidden
        finally:
            _capture.slot = previous
        if hidden is None:
            raise RuntimeError(f"xent_ext apply(): {type(self).__name__}.forward did not call "
                               "its output layer; call apply(model, fused_linear=False)")
        loss = loss_from_hidden(head, hidden, labels, options=options,
                                num_items_in_batch=call.get("num_items_in_batch"),
                                ignore_index=call.get("ignore_index", -100),
                                shift_labels=call.get("shift_labels"))
        if isinstance(out, tuple):  # return_dict=False: (loss, ...) without the logits
            return (loss,) + tuple(out[1:])
        fields = {k: v for k, v in out.items() if k not in ("loss", "logits")}
        return type(out)(loss=loss, logits=None, **fields)

    _FORWARDS[cls] = forward
    return forward


def _shifted(labels, ignore_index, shift_labels):
    """transformers' shift: position i predicts label i + 1, the last position nothing."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return shift_labels.reshape(-1)


def _normalised(loss, num_items_in_batch):
    """transformers' reduction: the sum over the number of items in the whole (accumulated)
    batch when the Trainer passes it, else the mean over this batch."""
    if num_items_in_batch is None:
        return loss
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


def loss_from_hidden(head, hidden, labels, *, options, num_items_in_batch=None,
                     ignore_index=-100, shift_labels=None):
    """The causal-LM loss from the hidden states entering lm_head (fused linear + CE)."""
    target = _shifted(labels, ignore_index, shift_labels).to(hidden.device)
    reduction = "mean" if num_items_in_batch is None else "sum"
    weight, bias = head.weight, head.bias
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        # What lm_head would have computed under autocast: the matmul in autocast's dtype.
        dtype = torch.get_autocast_dtype(device)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    loss = xent_ext.linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight, target,
                                         bias, ignore_index=ignore_index, reduction=reduction,
                                         **options)
    return _normalised(loss.float(), num_items_in_batch)


def causal_lm_loss(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100,
                   shift_labels=None, *, options, **kwargs):
    """transformers' ForCausalLMLoss on xent_ext's kernel (model.loss_function after apply)."""
    target = _shifted(labels, ignore_index, shift_labels).to(logits.device)
    reduction = "mean" if num_items_in_batch is None else "sum"
    # float32 logits, as transformers (a float32 loss for bfloat16 models).
    loss = xent_ext.cross_entropy(logits.float().reshape(-1, vocab_size), target,
                                  ignore_index=ignore_index, reduction=reduction, **options)
    return _normalised(loss, num_items_in_batch)


@functools.cache
def _label_smoother_class():
    from transformers.trainer_pt_utils import LabelSmoother

    class XentLabelSmoother(LabelSmoother):
        """transformers' LabelSmoother on xent_ext's kernel: torch's label smoothing
        (eps / C on every class) is the same loss, over the same denominator."""

        def __call__(self, model_output, labels, shift_labels=False, num_items_in_batch=None):
            logits = (model_output["logits"] if isinstance(model_output, dict)
                      else model_output[0])
            if shift_labels:
                logits, labels = logits[..., :-1, :], labels[..., 1:]
            reduction = "mean" if num_items_in_batch is None else "sum"
            loss = xent_ext.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                          labels.reshape(-1).to(logits.device),
                                          ignore_index=self.ignore_index, reduction=reduction,
                                          label_smoothing=self.epsilon)
            return _normalised(loss, num_items_in_batch)

    XentLabelSmoother.__qualname__ = "XentLabelSmoother"
    return XentLabelSmoother


def install_label_smoother():
    """Trainers created from now on smooth labels with xent_ext (transformers.trainer and
    trainer_pt_utils name the class; both are swapped)."""
    _transformers()
    import transformers.trainer as trainer_module
    import transformers.trainer_pt_utils as pt_utils

    cls = _label_smoother_class()
    pt_utils.LabelSmoother = cls
    trainer_module.LabelSmoother = cls
    return cls
