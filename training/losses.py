"""The FluxSR training losses, one documented function each (FLUXSR.md sections 2-4).

* :func:`ftd_loss`: Flow Trajectory Distillation. The equations live in
  :mod:`fluxsr_core.flow`; this only draws ``t ~ U[T_L, 1]`` and calls them.
* :func:`total_variation_map` and :func:`tv_lpips`: LPIPS of the images plus ``gamma`` times
  LPIPS of their total-variation maps.
* :func:`attention_diversification_loss` and :class:`ADLFeatureHook`: the token-feature form
  of ADL, on image-token hidden states taken from chosen FLUX blocks by forward hooks.

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
        raise ValueError("empty ADL block selection; use e.g. 'double:0,5;single:10'")
    counts = {"double": n_double, "single": n_single}
    out: list[tuple[str, int]] = []
    for part in parts:
        kind, sep, idx = part.partition(":")
        kind = kind.strip().lower()
        if kind not in counts or not sep or not idx.strip():
            raise ValueError(f"ADL block selection {part!r}: expected 'double:<indices>' or "
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
                    raise ValueError(f"ADL block selection {part!r}: {tok!r} is not an integer") from None
                if not -n <= i < n:
                    raise ValueError(f"ADL block selection {part!r}: index {i} is out of range; this "
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


class ADLFeatureHook:
    """Collects image-token hidden states ``[B, N_img, D]`` from chosen FLUX blocks.

    ``ADLFeatureHook(model, blocks="double:-1;single:-1")`` registers forward hooks on the
    selected ``transformer_blocks`` ("double") and ``single_transformer_blocks`` ("single") of
    the FLUX transformer inside ``model`` (plain, peft-wrapped or DDP-wrapped). Each block's
    output is reduced to its image tokens:

    * diffusers >= 0.32 (0.42 checked): both block kinds return
      ``(encoder_hidden_states, hidden_states)``; the single block splits text from image
      tokens itself, so ``hidden_states`` (element 1) are the image tokens.
    * older diffusers: the single block returns one tensor of ``[text; image]`` tokens (text
      first); the image tokens are the last ``N_img`` ones, with ``N_img`` read from the
      transformer's own input by a pre-hook.

    While :attr:`active` (default), every forward overwrites the features (last forward wins),
    except forwards run inside a backward pass (gradient-checkpoint recomputation), which are
    ignored. :meth:`capture` scopes recording to one block of code. Hooks are removed by
    :meth:`remove` or on leaving a ``with`` block. Captured features keep their autograd graph
    (diffusers' checkpointing is non-reentrant), so :meth:`loss` trains the model.
    """

    def __init__(self, model: torch.nn.Module, blocks: Union[str, Sequence[str]] = DEFAULT_ADL_BLOCKS,
                 active: bool = True):
        self.transformer = find_flux_transformer(model)
        n_double = len(self.transformer.transformer_blocks)
        n_single = len(self.transformer.single_transformer_blocks)
        self.selection = parse_block_spec(blocks, n_double, n_single)
        self.labels = [f"{k}:{i}" for k, i in self.selection]
        self.active = bool(active)
        self._features: dict[str, torch.Tensor] = {}
        self._n_img: Optional[int] = None
        self._handles = [self.transformer.register_forward_pre_hook(self._pre_hook, with_kwargs=True)]
        for (kind, i), label in zip(self.selection, self.labels):
            block = getattr(self.transformer, _KINDS[kind])[i]
            self._handles.append(block.register_forward_hook(self._make_hook(label)))

    def _pre_hook(self, module, args, kwargs):
        hs = kwargs.get("hidden_states", args[0] if args else None)
        if isinstance(hs, torch.Tensor) and hs.ndim == 3:
            self._n_img = int(hs.shape[1])

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
            if self.active and not _in_backward():
                self._features[label] = self._image_tokens(label, output)
        return hook

    def clear(self) -> None:
        """Forget the collected features."""
        self._features.clear()

    @contextlib.contextmanager
    def capture(self) -> Iterator["ADLFeatureHook"]:
        """Record only inside this block: clears, activates, and deactivates on exit."""
        self.clear()
        self.active = True
        try:
            yield self
        finally:
            self.active = False

    def features(self) -> list[torch.Tensor]:
        """Image-token features ``[B, N_img, D]`` of the selected blocks, in selection order."""
        missing = [lb for lb in self.labels if lb not in self._features]
        if missing:
            raise RuntimeError(f"no features from blocks {missing}: run the transformer forward while "
                               "the hook is active (inside capture()) before asking for the ADL loss")
        return [self._features[lb] for lb in self.labels]

    def loss(self, eps: float = ADL_EPS) -> torch.Tensor:
        """:func:`attention_diversification_loss` of the collected features."""
        return attention_diversification_loss(self.features(), eps=eps)

    def remove(self) -> None:
        """Remove every hook and drop the features."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.clear()

    def __enter__(self) -> "ADLFeatureHook":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.remove()
