"""The FluxSR training losses, one documented function each (FLUXSR.md sections 2-4).

* :func:`ftd_loss`: Flow Trajectory Distillation. The equations live in
  :mod:`fluxsr_core.flow`; this only draws ``t ~ U[T_L, 1]`` and calls them.
* :func:`total_variation_map` and :func:`tv_lpips`: LPIPS of the images plus ``gamma`` times
  LPIPS of their total-variation maps.
* ADL in two forms, each a loss function and a hook that feeds it from chosen FLUX blocks
  (:func:`make_adl_hook` picks one): :func:`attention_diversification_loss` with
  :class:`ADLFeatureHook`, the token-feature form on image-token hidden states; and
  :func:`attention_map_diversification_loss` with :class:`ADLAttentionHook`, the ICCV 2023
  form on the attention rows of sampled image-token queries.

MSE is plain ``torch.nn.functional.mse_loss``. The weights of the terms are the trainer's.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from fluxsr_core import flow
from fluxsr_core.interfaces import VelocityModel

# --- FTD ----------------------------------------------------------------------------------


def ftd_loss(model: VelocityModel, z_l: torch.Tensor, z0: torch.Tensor, eps: torch.Tensor,
             t_l: float, cond: Any, t: Optional[torch.Tensor] = None,
             generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Flow Trajectory Distillation loss (FLUXSR.md section 2), a thin wrapper of the core.

    ``z_l``: encoded upsampled LR latent, ``z0``: the teacher's image latent, ``eps``: its
    noise, all ``[B, 16, h, w]`` normalised. ``t``: per-sample times ``[B]`` in ``[T_L, 1]``;
    drawn uniformly with ``generator`` when None. Returns the scalar
    ``mean || (u - T_L v_theta(z_t, t)) / (1 - T_L) - (eps - z_L) / (1 - T_L) ||^2``
    computed by :func:`fluxsr_core.flow.ftd_loss`.
    """
    t_l = flow.check_t_l(t_l)
    if not (z_l.shape == z0.shape == eps.shape):
        raise ValueError(f"z_l {tuple(z_l.shape)}, z0 {tuple(z0.shape)} and eps {tuple(eps.shape)} "
                         "must have the same shape")
    if t is None:
        t = flow.sample_ftd_time(z_l.shape[0], t_l, generator=generator, device=generator.device
                                 if generator is not None else None).to(z_l.device)
    t = torch.as_tensor(t, dtype=torch.float32, device=z_l.device)
    if t.ndim == 0:
        t = t.expand(z_l.shape[0])
    if t.shape != (z_l.shape[0],):
        raise ValueError(f"t must be a scalar or shaped [{z_l.shape[0]}], got {tuple(t.shape)}")
    if bool(((t < t_l - 1e-6) | (t > 1.0 + 1e-6)).any()):
        raise ValueError(f"FTD times must lie in [T_L, 1] = [{t_l}, 1], got {t.tolist()}")
    return flow.ftd_loss(model, z_l, z0, eps, t, t_l, cond)


# --- TV-LPIPS -----------------------------------------------------------------------------

TV_MAX = 2.0  # |dx| + |dy| of an image in [0, 1] is at most 1 + 1


def total_variation_map(img: torch.Tensor) -> torch.Tensor:
    """Anisotropic total-variation map ``|dx| + |dy|`` per channel, same size as ``img``.

    ``img``: ``[B, C, H, W]``. Forward differences ``x[i, j+1] - x[i, j]`` and
    ``x[i+1, j] - x[i, j]`` after replicate padding on the right and bottom, so the last
    column/row has a zero difference across the border instead of a fake edge. For images in
    ``[0, 1]`` the map lies in ``[0, 2]`` (:data:`TV_MAX`).
    """
    if img.ndim != 4:
        raise ValueError(f"total_variation_map expects [B, C, H, W], got shape {tuple(img.shape)}")
    padded = F.pad(img, (0, 1, 0, 1), mode="replicate")
    dx = padded[..., :-1, 1:] - padded[..., :-1, :-1]
    dy = padded[..., 1:, :-1] - padded[..., :-1, :-1]
    return dx.abs() + dy.abs()


def tv_map_to_lpips_range(tv: torch.Tensor) -> torch.Tensor:
    """Map a TV map of a ``[0, 1]`` image from ``[0, 2]`` to LPIPS's ``[-1, 1]``: ``tv - 1``.

    ``tv / TV_MAX * 2 - 1`` with the fixed bound ``TV_MAX = 2``. A fixed linear map keeps
    the loss sensitive to edge *strength* (a per-image max normalisation would make a faint
    and a strong edge look alike, and blows up noise on flat images) and never clips, so the
    gradient reaches every pixel. Natural images have small TV values, so most of the map sits
    near -1 (dark) with edges brighter: the same layout LPIPS sees in a dark image with
    bright lines, well inside its input range. (An unclamped image's overshoot can take a few
    values past 1; they are not clipped either.)
    """
    return tv / TV_MAX * 2.0 - 1.0


def _per_sample(value: torch.Tensor, batch: int) -> torch.Tensor:
    """LPIPS returns ``[B, 1, 1, 1]`` (``lpips`` package) or ``[B]``; reduce to ``[B]``."""
    value = torch.as_tensor(value)
    if value.ndim == 0:
        return value.expand(batch)
    return value.reshape(value.shape[0], -1).mean(dim=1)


def tv_lpips(a: torch.Tensor, b: torch.Tensor, lpips_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
             gamma: float = 1.0, reduction: str = "mean") -> torch.Tensor:
    """``TV-LPIPS(a, b) = LPIPS(a, b) + gamma * LPIPS(TV(a), TV(b))`` (FLUXSR.md section 3).

    ``a``, ``b``: images ``[B, 3, H, W]`` in ``[0, 1]`` (the decoded one-step output, which
    training passes unclamped so it may overshoot a little, and the teacher image). ``lpips_fn(x, y)``: a perceptual distance taking images in ``[-1, 1]``
    (e.g. the module from :func:`fluxsr_training.perceptual.load_perceptual`). Images are
    mapped with ``2 x - 1``; TV maps with :func:`tv_map_to_lpips_range`. ``reduction``:
    ``"mean"`` (scalar) or ``"none"`` (``[B]``).
    """
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"tv_lpips expects two [B, C, H, W] images of one shape, got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none' (got {reduction!r})")
    n = a.shape[0]
    image_term = _per_sample(lpips_fn(a * 2.0 - 1.0, b * 2.0 - 1.0), n)
    tv_term = _per_sample(lpips_fn(tv_map_to_lpips_range(total_variation_map(a)),
                                   tv_map_to_lpips_range(total_variation_map(b))), n)
    out = image_term + float(gamma) * tv_term
    return out.mean() if reduction == "mean" else out


# --- ADL ----------------------------------------------------------------------------------

ADL_EPS = 1e-8


def attention_diversification_loss(features: Union[torch.Tensor, Sequence[torch.Tensor]],
                                   eps: float = ADL_EPS) -> torch.Tensor:
    """Token-feature ADL (FLUXSR.md section 4): mean cosine of each token with the mean token.

    ``features``: one ``[B, N, D]`` tensor or a list of them (image-token hidden states of
    chosen blocks). Per block: ``m = mean_n x_n`` and
    ``cos_n = <x_n, m> / (max(|x_n|, eps) * max(|m|, eps))``; the block's value is the mean
    of ``cos_n`` over tokens and batch; the loss is the mean over blocks. Lower means more
    diverse tokens; 1 when all tokens point one way. A zero token, or a zero mean token (e.g.
    two opposite tokens), has cosine 0 by this definition rather than NaN. Computed in
    float32 whatever the feature dtype.
    """
    if isinstance(features, torch.Tensor):
        features = [features]
    features = list(features)
    if not features:
        raise ValueError("attention_diversification_loss needs at least one feature tensor; "
                         "did the hooked blocks run?")
    values = []
    for k, f in enumerate(features):
        if f.ndim != 3 or f.shape[1] < 1:
            raise ValueError(f"ADL feature {k} must be [B, N, D] token features, got shape {tuple(f.shape)}")
        f = f.float()
        m = f.mean(dim=1, keepdim=True)
        dot = (f * m).sum(dim=-1)
        denom = f.norm(dim=-1).clamp_min(eps) * m.norm(dim=-1).clamp_min(eps)
        values.append((dot / denom).mean())
    return torch.stack(values).mean()


def attention_map_diversification_loss(queries: torch.Tensor, keys: torch.Tensor,
                                       eps: float = ADL_EPS) -> torch.Tensor:
    """Attention-map ADL (FLUXSR.md section 4, the ICCV 2023 form) for one attention layer.

    ``queries``: ``[B, H, S, d]`` (image-token queries, after the q-norm and RoPE, usually a
    sample of them); ``keys``: ``[B, H, N, d]`` (every token the attention sees, text
    included). The attention rows are ``a_s = softmax(q_s k^T / sqrt(d))``; per head,
    ``m = mean_s a_s`` and ``cos_s = <a_s, m> / (max(|a_s|, eps) * max(|m|, eps))``; the value is
    the mean of ``cos_s`` over queries, heads and batch. 1 when every query attends alike (the
    collapse behind periodic artefacts); lower when they attend to different tokens. Computed
    in float32 whatever the input dtype.
    """
    if queries.ndim != 4 or keys.ndim != 4 or queries.shape[:2] != keys.shape[:2] or \
            queries.shape[-1] != keys.shape[-1] or queries.shape[2] < 1 or keys.shape[2] < 1:
        raise ValueError("attention-map ADL needs queries [B, H, S, d] and keys [B, H, N, d] with the same "
                         f"B, H and d; got {tuple(queries.shape)} and {tuple(keys.shape)}")
    q, k = queries.float(), keys.float()
    attn = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)   # [B, H, S, N]
    m = attn.mean(dim=2, keepdim=True)
    dot = (attn * m).sum(dim=-1)
    denom = attn.norm(dim=-1).clamp_min(eps) * m.norm(dim=-1).clamp_min(eps)
    return (dot / denom).mean()


ADL_FORMS = ("tokens", "attention")
DEFAULT_ADL_QUERIES = 256   # ours: image-token queries sampled per sample and block


DEFAULT_ADL_BLOCKS = "double:-1;single:-1"  # ours: the last block of each kind, nearest the output
_KINDS = {"double": "transformer_blocks", "single": "single_transformer_blocks"}


def parse_block_spec(spec: Union[str, Sequence[str]], n_double: int, n_single: int) -> list[tuple[str, int]]:
    """Parse a block selection such as ``"double:0,5;single:10"`` into ``[(kind, index)]``.

    Groups are separated by ``;`` or whitespace (or given as a list); each is
    ``double:<indices>`` or ``single:<indices>``, indices comma-separated, negative from the
    end, or ``all``. Duplicates are dropped, order kept.
    """
    groups = [spec] if isinstance(spec, str) else list(spec)
    parts = [g for s in groups for g in re.split(r"[;\s]+", str(s).strip()) if g]
    if not parts:
        raise ValueError("empty block selection; use e.g. 'double:0,5;single:10'")
    counts = {"double": n_double, "single": n_single}
    out: list[tuple[str, int]] = []
    for part in parts:
        kind, sep, idx = part.partition(":")
        kind = kind.strip().lower()
        if kind not in counts or not sep or not idx.strip():
            raise ValueError(f"block selection {part!r}: expected 'double:<indices>' or "
                             "'single:<indices>' (e.g. 'double:0,5;single:10', 'single:all')")
        n = counts[kind]
        if idx.strip().lower() == "all":
            indices = list(range(n))
        else:
            indices = []
            for tok in idx.split(","):
                try:
                    i = int(tok)
                except ValueError:
                    raise ValueError(f"block selection {part!r}: {tok!r} is not an integer") from None
                if not -n <= i < n:
                    raise ValueError(f"block selection {part!r}: index {i} is out of range; this "
                                     f"model has {n} {kind} blocks (0..{n - 1}, or negative from the end)")
                indices.append(i % n)
        for i in indices:
            if (kind, i) not in out:
                out.append((kind, i))
    return out


def find_flux_transformer(model: torch.nn.Module) -> torch.nn.Module:
    """The ``FluxTransformer2DModel``-like module inside ``model`` (peft, DDP or plain)."""
    for m in model.modules():
        if isinstance(getattr(m, "transformer_blocks", None), torch.nn.ModuleList) and \
                isinstance(getattr(m, "single_transformer_blocks", None), torch.nn.ModuleList):
            return m
    raise ValueError(f"{type(model).__name__} holds no FLUX transformer (no module with "
                     "transformer_blocks and single_transformer_blocks); ADL hooks need one")


def _in_backward() -> bool:
    """True while autograd runs a backward pass (e.g. gradient-checkpoint recomputation)."""
    get = getattr(torch._C, "_current_graph_task_id", None)
    return get is not None and get() != -1


class ADLHook:
    """What both ADL hooks share: the FLUX transformer inside ``model`` (plain, peft- or
    DDP-wrapped), the selected blocks (:func:`parse_block_spec`), the image-token count of the
    running forward (a pre-hook on the transformer), and the recording scope.

    While :attr:`active` (default), every forward overwrites what was recorded (last forward
    wins), except forwards run inside a backward pass (gradient-checkpoint recomputation),
    which are ignored. :meth:`capture` scopes recording to one block of code. Hooks are removed
    by :meth:`remove` or on leaving a ``with`` block. What is recorded keeps its autograd graph
    (diffusers' checkpointing is non-reentrant), so :meth:`loss` trains the model.
    """

    def __init__(self, model: torch.nn.Module, blocks: Union[str, Sequence[str]], active: bool):
        self.transformer = find_flux_transformer(model)
        n_double = len(self.transformer.transformer_blocks)
        n_single = len(self.transformer.single_transformer_blocks)
        self.selection = parse_block_spec(blocks, n_double, n_single)
        self.labels = [f"{k}:{i}" for k, i in self.selection]
        self.active = bool(active)
        self._recorded: dict[str, Any] = {}
        self._n_img: Optional[int] = None
        self._handles = [self.transformer.register_forward_pre_hook(self._pre_hook, with_kwargs=True)]

    def _selected_blocks(self) -> Iterator[tuple[str, str, torch.nn.Module]]:
        for (kind, i), label in zip(self.selection, self.labels):
            yield label, kind, getattr(self.transformer, _KINDS[kind])[i]

    def _pre_hook(self, module, args, kwargs):
        hs = kwargs.get("hidden_states", args[0] if args else None)
        if isinstance(hs, torch.Tensor) and hs.ndim == 3:
            self._n_img = int(hs.shape[1])

    def _recording(self) -> bool:
        return self.active and not _in_backward()

    def _all_recorded(self, what: str) -> None:
        missing = [lb for lb in self.labels if lb not in self._recorded]
        if missing:
            raise RuntimeError(f"no {what} from blocks {missing}: run the transformer forward while "
                               "the hook is active (inside capture()) before asking for the ADL loss")

    def clear(self) -> None:
        """Forget what was recorded."""
        self._recorded.clear()

    @contextlib.contextmanager
    def capture(self) -> Iterator["ADLHook"]:
        """Record only inside this block: clears, activates, and deactivates on exit."""
        self.clear()
        self.active = True
        try:
            yield self
        finally:
            self.active = False

    def remove(self) -> None:
        """Remove every hook and drop what was recorded."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.clear()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.remove()


class ADLFeatureHook(ADLHook):
    """Collects image-token hidden states ``[B, N_img, D]`` from chosen FLUX blocks for the
    token-feature ADL (:func:`attention_diversification_loss`).

    ``ADLFeatureHook(model, blocks="double:-1;single:-1")`` registers forward hooks on the
    selected ``transformer_blocks`` ("double") and ``single_transformer_blocks`` ("single").
    Each block's output is reduced to its image tokens:

    * diffusers >= 0.35 (0.42 checked): both block kinds return
      ``(encoder_hidden_states, hidden_states)``; the single block splits text from image
      tokens itself, so ``hidden_states`` (element 1) are the image tokens.
    * older diffusers (0.32.2 checked): the single block returns one tensor of ``[text; image]``
      tokens (text first); the image tokens are the last ``N_img`` ones, with ``N_img`` read
      from the transformer's own input by a pre-hook.

    Recording rules: :class:`ADLHook`.
    """

    def __init__(self, model: torch.nn.Module, blocks: Union[str, Sequence[str]] = DEFAULT_ADL_BLOCKS,
                 active: bool = True):
        super().__init__(model, blocks, active)
        for label, _, block in self._selected_blocks():
            self._handles.append(block.register_forward_hook(self._make_hook(label)))

    def _image_tokens(self, label: str, output: Any) -> torch.Tensor:
        n = self._n_img
        if isinstance(output, (tuple, list)):
            if len(output) >= 2 and isinstance(output[1], torch.Tensor) and \
                    (n is None or output[1].shape[1] == n):
                return output[1]
            if isinstance(output[0], torch.Tensor) and n is not None and output[0].shape[1] == n:
                return output[0]  # a (hidden_states, encoder_hidden_states) order
            raise RuntimeError(f"ADL hook on {label}: cannot find image tokens in the block output "
                               f"(shapes {[tuple(o.shape) for o in output if isinstance(o, torch.Tensor)]})")
        if isinstance(output, torch.Tensor) and output.ndim == 3:
            if n is None:
                raise RuntimeError(f"ADL hook on {label}: the block returned joint text+image tokens but "
                                   "the image token count is unknown (transformer called without "
                                   "hidden_states?)")
            return output[:, -n:]  # [text; image]: text tokens come first
        raise RuntimeError(f"ADL hook on {label}: unexpected block output type {type(output).__name__}")

    def _make_hook(self, label: str):
        def hook(module, args, output):
            if self._recording():
                self._recorded[label] = self._image_tokens(label, output)
        return hook

    def features(self) -> list[torch.Tensor]:
        """Image-token features ``[B, N_img, D]`` of the selected blocks, in selection order."""
        self._all_recorded("features")
        return [self._recorded[lb] for lb in self.labels]

    def loss(self, eps: float = ADL_EPS, sample_seeds: Optional[Sequence[int]] = None) -> torch.Tensor:
        """:func:`attention_diversification_loss` of the collected features. ``sample_seeds``
        is accepted for the common interface with :class:`ADLAttentionHook`; this form uses
        every token, so there is nothing to sample."""
        return attention_diversification_loss(self.features(), eps=eps)


def _diffusers_sequence_dim() -> int:
    """Where FLUX's attention keeps the token axis after the head split: ``[B, N, H, d]`` since
    diffusers 0.35, ``[B, H, N, d]`` before. Only consulted when a shape cannot tell (N == H)."""
    import diffusers
    from packaging.version import Version

    return 1 if Version(diffusers.__version__).release >= (0, 35) else 2


class ADLAttentionHook(ADLHook):
    """Records the queries and keys of chosen FLUX blocks' attention for the attention-map
    ADL (:func:`attention_map_diversification_loss`).

    Forward hooks on each selected block's ``attn.norm_q`` / ``norm_k`` (and ``norm_added_k``,
    the text keys of a double block) take the normalised projections the attention itself
    uses, so nothing is computed twice and any processor that calls these norms is covered. A
    pre-hook on ``attn`` takes its rotary embedding; :meth:`attention_inputs` applies it with
    diffusers' own ``apply_rotary_emb``, as the processor does. The queries are the image
    tokens'; the keys are every token's, text first, as in the model.

    :meth:`loss` samples ``queries`` image tokens per sample (all of them when there are fewer):
    the attention rows cost ``B * H * queries * N`` floats per block instead of ``N^2``. With
    ``sample_seeds`` (one per sample, as the trainer gives) the draw depends only on the seed;
    without, on this hook's own generator (``seed``). Recording rules: :class:`ADLHook`.
    """

    def __init__(self, model: torch.nn.Module, blocks: Union[str, Sequence[str]] = DEFAULT_ADL_BLOCKS,
                 queries: int = DEFAULT_ADL_QUERIES, active: bool = True, seed: int = 0):
        super().__init__(model, blocks, active)
        if int(queries) < 1:
            raise ValueError(f"the attention-map ADL needs at least one query per sample (got {queries})")
        self.queries = int(queries)
        self._generator = torch.Generator().manual_seed(int(seed))
        for label, kind, block in self._selected_blocks():
            attn = getattr(block, "attn", None)
            norms = ["norm_q", "norm_k"] + (["norm_added_k"] if kind == "double" else [])
            absent = [n for n in norms if not isinstance(getattr(attn, n, None), torch.nn.Module)]
            if attn is None or absent:
                raise ValueError(f"ADL attention hook on {label}: the block has no attention with "
                                 f"{', '.join(absent) or 'norm_q'} (FLUX's q/k RMS norms); use "
                                 "loss.adl_form=tokens with this model")
            self._handles.append(attn.register_forward_pre_hook(self._rope_hook(label), with_kwargs=True))
            for name in norms:
                self._handles.append(getattr(attn, name).register_forward_hook(self._norm_hook(label, name)))

    def _rope_hook(self, label: str):
        def hook(module, args, kwargs):
            if self._recording():
                # a new forward of this block: drop the previous one's tensors
                self._recorded[label] = {"rope": kwargs.get("image_rotary_emb"), "n_img": self._n_img}
        return hook

    def _norm_hook(self, label: str, name: str):
        def hook(module, args, output):
            if self._recording() and label in self._recorded:
                self._recorded[label][name] = output
        return hook

    def _heads_first(self, x: torch.Tensor, n_tokens: int, label: str, name: str) -> torch.Tensor:
        """``x`` as ``[B, H, n_tokens, d]``, whichever layout this diffusers version uses."""
        dims = [d for d in (1, 2) if x.ndim == 4 and x.shape[d] == n_tokens]
        if not dims:
            raise RuntimeError(f"ADL attention hook on {label}: {name} has shape {tuple(x.shape)}, not "
                               f"[B, {n_tokens} tokens, heads, d] or [B, heads, {n_tokens} tokens, d]; this "
                               "FLUX attention is not one the hook knows (use loss.adl_form=tokens)")
        seq = dims[0] if len(dims) == 1 else _diffusers_sequence_dim()
        return x.transpose(1, 2) if seq == 1 else x

    def attention_inputs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per selected block, ``(image queries [B, H, N_img, d], keys [B, H, N, d])`` after the
        q/k norms and RoPE, exactly as the block's attention used them."""
        from diffusers.models.embeddings import apply_rotary_emb

        self._all_recorded("attention inputs")
        out = []
        for label, kind, _ in self._selected_blocks():
            rec = self._recorded[label]
            rope, n_img = rec["rope"], rec["n_img"]
            if rope is None or n_img is None:
                raise RuntimeError(f"ADL attention hook on {label}: the attention ran without a rotary "
                                   "embedding or the image token count is unknown; FLUX passes both")
            missing = [n for n in ("norm_q", "norm_k", "norm_added_k") if n not in rec and
                       (n != "norm_added_k" or kind == "double")]
            if missing:
                raise RuntimeError(f"ADL attention hook on {label}: {', '.join(missing)} did not run in the "
                                   "attention (a processor that skips FLUX's q/k norms?); use loss.adl_form=tokens")
            cos, sin = rope
            n_all = int(cos.shape[0])
            if kind == "double":   # image q/k here; text keys from the added projections
                q = self._heads_first(rec["norm_q"], n_img, label, "norm_q")
                k = torch.cat([self._heads_first(rec["norm_added_k"], n_all - n_img, label, "norm_added_k"),
                               self._heads_first(rec["norm_k"], n_img, label, "norm_k")], dim=2)
            else:                  # the single block attends over the joint [text; image] tokens
                q = self._heads_first(rec["norm_q"], n_all, label, "norm_q")[:, :, -n_img:]
                k = self._heads_first(rec["norm_k"], n_all, label, "norm_k")
            q = apply_rotary_emb(q, (cos[-n_img:], sin[-n_img:]))
            k = apply_rotary_emb(k, (cos, sin))
            out.append((q, k))
        return out

    def _query_indices(self, batch: int, n_img: int, sample_seeds: Optional[Sequence[int]]) -> Optional[torch.Tensor]:
        if self.queries >= n_img:
            return None
        if sample_seeds is not None:
            if len(sample_seeds) != batch:
                raise ValueError(f"ADL: {len(sample_seeds)} sample seeds for a batch of {batch}")
            gens = [torch.Generator().manual_seed(int(s)) for s in sample_seeds]
        else:
            gens = [self._generator] * batch
        return torch.stack([torch.randperm(n_img, generator=g)[:self.queries] for g in gens])

    def loss(self, eps: float = ADL_EPS, sample_seeds: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Mean over the selected blocks of :func:`attention_map_diversification_loss`, on
        ``queries`` sampled image-token queries per sample (the same ones in every block)."""
        inputs = self.attention_inputs()
        b, h, n_img, d = inputs[0][0].shape
        idx = self._query_indices(b, n_img, sample_seeds)
        values = []
        for q, k in inputs:
            if idx is not None:
                q = q.gather(2, idx.to(q.device)[:, None, :, None].expand(b, h, idx.shape[1], d))
            values.append(attention_map_diversification_loss(q, k, eps=eps))
        return torch.stack(values).mean()


def make_adl_hook(model: torch.nn.Module, form: str = "tokens", blocks: Union[str, Sequence[str]] = DEFAULT_ADL_BLOCKS,
                  queries: int = DEFAULT_ADL_QUERIES, active: bool = True) -> ADLHook:
    """The ADL hook of ``form`` (:data:`ADL_FORMS`): ``tokens`` (:class:`ADLFeatureHook`) or
    ``attention`` (:class:`ADLAttentionHook` with ``queries`` sampled queries)."""
    if form == "tokens":
        return ADLFeatureHook(model, blocks, active=active)
    if form == "attention":
        return ADLAttentionHook(model, blocks, queries=queries, active=active)
    raise ValueError(f"unknown ADL form {form!r}; use one of {', '.join(ADL_FORMS)}")
