"""What the prompt masked LMs and prompt causal LMs share: label words, the label-word head, the depth-cache guard.

A prompt LM classifies with its own LM head at one position per example (the mask for a masked LM, the last
prompt token for a causal LM): class c scores s_c = w_{v(c)} · h + b_{v(c)} with v the label word of class c.
`PromptLMMixin` holds everything that does not depend on where that position is or how the layer stack runs:

- the label words (validated, stored in the config so they travel with checkpoints the stock classes load);
- the output projection wrapped in a `LabelWordDecoder` holding the same Parameter objects (ties survive), and
  `_label_word_logits`, which runs the head restricted to the label-word rows and the LM-BFF loss;
- `frozen_depth` and `_cacheable_depth`: the depth below the first trainable layer, and whether the depth cache may
  serve this call (see `depth_cache` for why it is exact), with the fingerprint of everything below the cut.

A subclass names its stack with `_stack_layers()` (the layer list) and `_embedding_modules()` (what runs before
layer 0), and implements its forward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from .depth_cache import DEFAULT_MAX_BYTES, DepthCache, module_state_fingerprint, tensor_fingerprint
from .label_words import LabelWordDecoder, label_word_loss, validate_label_word_ids


def _sharded_parameter_types() -> tuple[type, ...]:
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch build without torch.distributed
        return ()
    return FSDPModule, FullyShardedDataParallel, DTensor


def gathers_parameters(module: nn.Module) -> bool:
    """Whether `module` holds sharded parameters that hooks around its forward gather (FSDP 1/2, ZeRO-3).

    Such a module must run whole, and on every rank alike: calling its children directly would read shards,
    and a cache hit on one rank with a miss on another would leave the others waiting in its collectives.
    """
    return holds_sharded_parameters(module.modules(), module.parameters())


def holds_sharded_parameters(modules: Iterable[nn.Module], parameters: Iterable[torch.Tensor]) -> bool:
    """`gathers_parameters` over modules and parameters a caller has already walked to."""
    types = _sharded_parameter_types()
    return any(isinstance(m, types) for m in modules) or any(
        isinstance(p, types) or hasattr(p, "ds_id") for p in parameters
    )


_FUNCTIONAL_DROPOUT_ATTRIBUTES = ("dropout", "attention_dropout", "activation_dropout", "dropout_prob")


def _drops_out(module: nn.Module) -> bool:
    """Whether `module` applies dropout in this mode: an active `nn.Dropout`, or a float rate it passes to
    `F.dropout` / the attention kernel itself (OPT's layers, most attention modules)."""
    if not module.training:
        return False
    if isinstance(module, nn.Dropout):
        return module.p > 0
    return any(
        isinstance(rate := getattr(module, name, None), float) and rate > 0 for name in _FUNCTIONAL_DROPOUT_ATTRIBUTES
    )


def _drops_layers(model: nn.Module) -> bool:
    """LayerDrop (OPT's `layerdrop`) skips random layers in training."""
    return any(
        m.training and isinstance(getattr(m, "layerdrop", None), float) and m.layerdrop > 0 for m in model.modules()
    )


class PromptLMMixin:
    """Label words, the label-word head and the depth-cache guard, for a `transformers` LM with a layer stack.

    Extra constructor (and `from_pretrained`) arguments:
        label_word_ids: one vocabulary id per class (overrides `config.label_word_ids`); None keeps the config's.
        mask_token_id: the tokenizer's mask id (masked LMs: finds the mask; stored in the config).
        depth_cache_max_bytes: memory bound of the depth cache; 0 disables it.
    """

    def __init__(
        self,
        config,
        *args,
        label_word_ids: Sequence[int] | None = None,
        mask_token_id: int | None = None,
        depth_cache_max_bytes: int = DEFAULT_MAX_BYTES,
        **kwargs,
    ):
        super().__init__(config, *args, **kwargs)
        self._init_prompt_lm(label_word_ids, mask_token_id, depth_cache_max_bytes)

    def _init_prompt_lm(
        self, label_word_ids: Sequence | None, mask_token_id: int | None, depth_cache_max_bytes: int
    ) -> None:
        """The prompt-LM state on top of a built stock model (also what wrapping an existing model runs)."""
        config = self.config
        self._wrap_decoder()
        self.depth_cache = DepthCache(depth_cache_max_bytes)
        self._label_word_tensors: dict[torch.device, torch.Tensor] = {}
        self.set_label_word_ids(
            label_word_ids if label_word_ids is not None else getattr(config, "label_word_ids", None),
            mask_token_id=mask_token_id if mask_token_id is not None else getattr(config, "mask_token_id", None),
        )

    # ---- the stack (per model family) ---------------------------------------------------------------------

    def _stack_layers(self) -> nn.ModuleList:
        raise NotImplementedError

    def _embedding_modules(self) -> list[nn.Module]:
        raise NotImplementedError

    # ---- label words --------------------------------------------------------------------------------------

    @property
    def label_word_ids(self) -> list[int] | None:
        """The label word of each class (vocabulary ids), or None for the stock full-vocabulary head."""
        return getattr(self.config, "label_word_ids", None)

    # Whether a class's label word may be several tokens (the generic causal LM scores them; the others refuse).
    _multi_token_label_words = False

    def set_label_word_ids(self, label_word_ids: Sequence | None, mask_token_id: int | None = None) -> None:
        """Switch the head to class logits over `label_word_ids` (one label word per class); None restores the
        stock head. A label word is one token id (or, where the class scores them, a list of token ids).

        Both values are stored in the config, so they are saved with the model and restored by `from_pretrained`.
        """
        self.config.label_word_ids = validate_label_word_ids(
            label_word_ids, self.config.vocab_size, multi_token=self._multi_token_label_words
        )
        if mask_token_id is not None:
            if not isinstance(mask_token_id, int) or not 0 <= mask_token_id < self.config.vocab_size:
                raise ValueError(
                    f"mask_token_id must be a token id in [0, {self.config.vocab_size}), got {mask_token_id!r}; "
                    "pass tokenizer.mask_token_id."
                )
            self.config.mask_token_id = mask_token_id
        self._label_word_tensors = {}

    def _label_word_tensor(self, device: torch.device) -> torch.Tensor:
        if device not in self._label_word_tensors:
            self._label_word_tensors[device] = torch.tensor(self.label_word_ids, dtype=torch.long, device=device)
        return self._label_word_tensors[device]

    def _wrap_decoder(self) -> None:
        """Put the output projection in a LabelWordDecoder that holds the same Parameter objects, in place.

        Not through `set_output_embeddings`: BERT's also makes the head's own `bias` the decoder's bias object,
        a tie that `from_pretrained` does itself after loading; made before, it leaves a checkpoint without an
        MLM head with that bias uninitialized (on the meta device).
        """
        decoder = self.get_output_embeddings()
        for module in self.modules():
            for child_name, child in module.named_children():
                if child is decoder:
                    setattr(module, child_name, LabelWordDecoder.from_linear(decoder))
                    return
        raise TypeError(f"{type(self).__name__}: the output embeddings are not a submodule; cannot wrap them.")

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        if not isinstance(new_embeddings, LabelWordDecoder):
            new_embeddings = LabelWordDecoder.from_linear(new_embeddings)
        super().set_output_embeddings(new_embeddings)

    def _label_word_logits(
        self, head: Callable[[torch.Tensor], torch.Tensor], features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Class logits (batch × classes): `head(features)` with the output projection restricted to the label words.

        `head` is the stock head's own forward (for a masked LM its transform, then the decoder), so module-scoped
        perturbation sees every parameter inside its owner. Returns the logits and the label-word id tensor.
        """
        label_words = self._label_word_tensor(features.device)
        decoder = self.get_output_embeddings()
        if not isinstance(decoder, LabelWordDecoder):
            raise TypeError(
                f"The output embeddings are a {type(decoder).__name__}; the label-word head needs a "
                "LabelWordDecoder. Replace them with `model.set_output_embeddings(...)`, which wraps them."
            )
        with decoder.restricted_to(label_words):
            return head(features), label_words

    @staticmethod
    def _label_word_loss(logits, targets, num_items_in_batch):
        return None if targets is None else label_word_loss(logits, targets, num_items_in_batch)

    # ---- depth cache --------------------------------------------------------------------------------------

    def frozen_depth(self) -> int:
        """Layers below the first one holding a trainable parameter (0 if the embeddings train)."""
        if any(p.requires_grad for m in self._embedding_modules() for p in m.parameters()):
            return 0
        layers = self._stack_layers()
        for index, layer in enumerate(layers):
            if any(p.requires_grad for p in layer.parameters()):
                return index
        return len(layers)

    def _cacheable_depth(self) -> int:
        """The depth the cache may serve for this call: 0 unless every condition for exactness holds."""
        if not self.depth_cache.enabled:
            return 0
        if getattr(self, "_is_replica", False) or torch.jit.is_tracing() or torch.compiler.is_compiling():
            return 0  # nn.DataParallel rebuilds its replicas every forward; tracing must see the full graph
        depth = self.frozen_depth()
        if depth == 0:
            self.depth_cache.validate((0,), ())  # everything trains: release the entries
            return 0
        frozen = [*self._embedding_modules(), *self._stack_layers()[:depth]]
        # One walk over the frozen modules serves every check below: this runs on every forward (two a MeZO step),
        # where separate traversals per check cost as much as the one layer above the cut.
        modules = [m for root in frozen for m in root.modules()]
        parameters = [p for m in modules for p in m._parameters.values() if p is not None]
        if isinstance(self, _sharded_parameter_types()) or holds_sharded_parameters(modules, parameters):
            return 0  # sharded training (FSDP, ZeRO-3): each rank must run every layer's collectives
        if any(_drops_out(m) for m in modules) or _drops_layers(self):
            return 0  # active dropout (or LayerDrop) makes the frozen stack random: nothing to reuse
        tensors = parameters + [b for m in modules for b in m._buffers.values() if b is not None]
        fingerprint = (
            depth,
            self.config._attn_implementation,
            tensor_fingerprint(tensors),
            module_state_fingerprint(modules),
        )
        self.depth_cache.validate(fingerprint, tensors)
        return depth
