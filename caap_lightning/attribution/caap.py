"""CAAP: Causal Attribution via Activation Patching, for Vision Transformers (read as timm ones).

The semantics are fixed by ``SPEC-CAAP.md``: for each patch ``p`` the tokens in the
selection ``S(p)`` carry the source image's residual stream up to block ``k``, every other
patch token is frozen at the blank image's state, and the prefix tokens (CLS, registers)
are computed by every block. ``A[p]`` is the target's score read from the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from caap_lightning.attribution import vit
from caap_lightning.attribution.base import AttributionMethod
from caap_lightning.attribution.blanks import BlankSpec, check_blank, choose_blank, make_blank, warn_saturated_blank
from caap_lightning.attribution.selection import neighbourhoods, selection_members
from caap_lightning.attribution.twins import as_timm_vit
from caap_lightning.checks import TargetLike, check_choice, check_finite_weights, check_target, model_device_dtype
from caap_lightning.utils import eval_mode, model_normalization, target_score

CONSTRUCTIONS = ("parallel", "efficient", "windowed", "standard")
SCORES = ("probability", "logit")


def check_settings(
    selection: str, blank: BlankSpec, construction: str, constructions: Sequence[str], score: str,
    chunk_size: Optional[int],
) -> None:
    """The settings CAAP and ConvCAAP share, checked at construction with the same messages."""
    selection_members(selection, (1, 1))  # validates the name
    check_blank(blank)
    check_choice("construction", construction, constructions)
    check_choice("score", score, SCORES)
    positive_int = isinstance(chunk_size, int) and not isinstance(chunk_size, bool) and chunk_size >= 1
    if chunk_size is not None and not positive_int:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def sweep_cutoffs(
    method, classifier: nn.Module, cutoffs: Sequence[int], images: torch.Tensor, target: Optional[torch.Tensor],
    masks: Optional[torch.Tensor], step: Optional[int], progress: bool, name=None,
) -> List[dict]:
    """The calibration sweep of CAAP and ConvCAAP: ``method`` attributes ``images`` at each cutoff, the
    maps are scored with the RISE protocol on ``classifier`` (and AUPR1 where ``masks`` are given),
    and ``method.layer_cutoff`` is left at the best mean InsDel. ``name(k)``, where given, adds a
    ``"cut"`` column. Returns one row per cutoff."""
    from tqdm.auto import tqdm

    from caap_lightning.metrics.functional import aupr, insertion_deletion

    original, rows = method.layer_cutoff, []
    try:
        for k in tqdm(cutoffs, desc=f"{type(method).__name__} layer-cutoff sweep", disable=not progress):
            method.layer_cutoff = k
            # Absolute maps: a per-image constant (the blank's score) must not reorder near-tied patches.
            maps = method.attribute(images, target=target, relative=False)
            scores = insertion_deletion(classifier, images.to(maps.device), maps, target=target, step=step)
            row = {"layer_cutoff": k, **({} if name is None else {"cut": name(k)}),
                   "insertion": scores.insertion.mean().item(), "deletion": scores.deletion.mean().item()}
            row["insdel"] = row["insertion"] - row["deletion"]
            if masks is not None:
                row["aupr_fg"] = aupr(maps, masks.to(maps.device)).aupr.nanmean().item()
            rows.append(row)
    finally:
        method.layer_cutoff = original
    method.layer_cutoff = max(rows, key=lambda r: r["insdel"])["layer_cutoff"]
    return rows

# Bytes the chunk's largest temporary (the blank-score tensor) may take when chunk_size=None.
_CHUNK_BUDGET_BYTES = 256 * 2**20


@dataclass
class _BlankContext:
    """The blank's forward, computed once per call (weights may change between calls)."""

    states: vit.TokenStates  # h^b_l and the blank keys/values, batch dim 1
    logits: torch.Tensor  # (1, num_classes)
    final_normed: torch.Tensor  # norm(h^b_L) at the patch positions, (N, D): for avg pooling
    stats: Optional[List[Tuple[torch.Tensor, ...]]] = None  # E-CAAP's per-layer blank statistics


class CAAP(AttributionMethod):
    """Causal Attribution via Activation Patching for a timm ``VisionTransformer``.

    Args:
        model: a plain ViT (``twins.SUPPORTED_VITS``): timm's ``VisionTransformer`` (plain blocks,
            ``token`` or ``avg`` pooling), transformers' ``ViTForImageClassification``,
            ``DeiTForImageClassification`` and kin, torchvision's ``VisionTransformer``, or one of
            them compiled. ``self.model`` is the timm model read (for the others, a twin sharing
            their modules and parameters).
        layer_cutoff: ``k``, the number of leading blocks in which ``S(p)`` keeps the source's
            states; ``0..L``, default ``L // 2``.
        selection: ``S(p)``: ``"point"``, ``"box1"`` (3x3, default), ``"box2"`` (5x5) or
            ``"cross1"``. Border patches have fewer members, which biases their scores
            towards the blank's.
        blank: the context image: ``"white"``, ``"black"``, ``"mean"``, ``"noise"``,
            ``"blur_noise"``, ``"auto"`` (per call, the one of those the model reads as closest
            to no class; ``last_blank`` names it) or a normalised ``(1, 3, H, W)`` tensor.
        construction: ``"parallel"`` (exact, batched), ``"efficient"`` (E-CAAP, approximate),
            ``"windowed"`` (also recomputes blank tokens within ``window`` patches of ``p``)
            or ``"standard"`` (textbook activation patching, ``N`` forwards).
        score: ``"probability"`` (softmax of the target) or ``"logit"``.
        chunk_size: patches per batched pass; ``None`` picks one that bounds memory.
        window: radius ``w`` of the recomputed window for ``construction="windowed"``.
        mean, std: the model's input normalisation, when ``pretrained_cfg`` lacks it.
        blank_seed: seed of the ``noise`` and ``blur_noise`` blanks.
        head: for a ViT built with ``num_classes=0`` (whose forward gives pooled features),
            the module that maps those features ``(B, num_features)`` to logits, e.g. the
            LightningModule's own ``nn.Linear``; ``None`` uses the ViT's own head.
        relative: maps of ``A - A_blank`` (the evidence relative to the blank) by default;
            :meth:`attribute`'s ``relative`` overrides it per call.

    The blank's activations are computed once per call to :meth:`attribute` or
    :meth:`blank_score`, never kept between calls, so the maps always follow the current
    weights (optimiser steps, ``load_state_dict``, writes through ``p.data``).

    Example::

        caap = CAAP(model)
        maps = caap.attribute(images, target=labels)        # (B, gh, gw)
        rel = caap.attribute(images, target=labels, relative=True)
    """

    def __init__(
        self,
        model: nn.Module,
        layer_cutoff: Optional[int] = None,
        selection: str = "box1",
        blank: BlankSpec = "white",
        construction: str = "parallel",
        score: str = "probability",
        chunk_size: Optional[int] = None,
        window: int = 2,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
        blank_seed: int = 0,
        head: Optional[nn.Module] = None,
        relative: bool = False,
    ) -> None:
        model = as_timm_vit(model)  # a Hugging Face or torchvision ViT is read through its timm twin
        super().__init__(model, head)  # self.model: that timm model; self.classifier: it and ``head``
        depth = len(model.blocks)
        if layer_cutoff is None:
            layer_cutoff = depth // 2
        if isinstance(layer_cutoff, bool) or not isinstance(layer_cutoff, int) or not 0 <= layer_cutoff <= depth:
            raise ValueError(f"layer_cutoff must be an int in 0..{depth} (the model has {depth} blocks), got {layer_cutoff!r}")
        check_settings(selection, blank, construction, CONSTRUCTIONS, score, chunk_size)
        if not isinstance(window, int) or window < 0:
            raise ValueError(f"window must be a non-negative int, got {window!r}")
        self.relative = relative
        self.layer_cutoff = layer_cutoff
        self.selection = selection
        self.blank = blank
        self.construction = construction
        self.score = score
        self.chunk_size = chunk_size
        self.window = window
        self.mean, self.std = model_normalization(self.model, mean, std, self.adapter.channels)
        self.blank_seed = blank_seed
        self._last_size: Optional[Tuple[int, int]] = None
        self._warned_classes: set = set()
        # The blank of the last call: ``blank`` itself, or the kind ``"auto"`` chose then.
        self.last_blank: BlankSpec = blank

    @property
    def depth(self) -> int:
        return len(self.model.blocks)

    # ------------------------------------------------------------------ public API
    def attribute(
        self,
        images: torch.Tensor,
        target: TargetLike = None,
        upsample: bool = False,
        relative: Optional[bool] = None,
    ) -> torch.Tensor:
        """CAAP maps for a batch of normalised images ``(B, 3, H, W)``.

        Args:
            target: class per image (int, list or tensor); ``None`` = the predicted class.
            upsample: return pixel maps ``(B, H, W)`` (bilinear) instead of ``(B, gh, gw)``.
            relative: return ``A - A_blank``, the evidence for the class relative to the blank;
                ``None`` = the constructor's ``relative``.
        """
        return super().attribute(images, target, upsample, relative=relative)

    @torch.no_grad()
    def _attribute(
        self, images: torch.Tensor, targets: Optional[torch.Tensor], relative: Optional[bool] = None
    ) -> torch.Tensor:
        size, device, dtype = tuple(images.shape[-2:]), images.device, images.dtype
        self._last_size = size
        source = vit.forward_states(self.model, images)
        if targets is None:
            targets = self.classifier.pooled_logits(vit.pool_final(self.model, source.states[-1])).argmax(-1)
        blank = self._blank_context(size, device, dtype)
        self._warn_saturated(blank, targets)
        if self.construction == "standard":
            scores = self._standard(source, blank, size, targets)
        else:
            scores = self._grouped(source, blank, size, targets)
        maps = scores.float().unflatten(1, vit.grid_size(self.model, *size))
        if self.relative if relative is None else relative:
            maps = maps - self._score(blank.logits.float().expand(len(targets), -1), targets)[:, None, None]
        return maps

    @torch.no_grad()
    def blank_score(self, target: TargetLike = None, image_size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """``A_blank``: the blank image's own score for each target, ``(len(target),)``.

        ``target=None`` scores the blank's own top class (one value). ``image_size``
        defaults to the size last attributed, else the model's ``img_size``.
        """
        device, dtype = model_device_dtype(self.model)
        if target is not None:
            target = check_target(target, None, self.classifier.num_classes, device)
        check_finite_weights(self.model, self.head)
        size = tuple(image_size or self._last_size or self.model.patch_embed.img_size)
        with eval_mode(self.classifier):
            blank = self._blank_context(size, device, dtype)
        targets = blank.logits.argmax(-1) if target is None else target
        return self._score(blank.logits.float().expand(len(targets), -1), targets)

    def calibrate(
        self,
        probe,
        target: TargetLike = None,
        masks: Optional[torch.Tensor] = None,
        layer_cutoffs: Optional[Sequence[int]] = None,
        progress: bool = False,
        step: Optional[int] = None,
    ) -> List[dict]:
        """Pick ``layer_cutoff`` on a probe set by Insertion minus Deletion, and set it.

        The cumulative cutoff sweep of the paper's Fig. 7 on the user's own images: for
        each ``k`` (default ``0..L``) the maps are scored with the RISE protocol (and
        AUPR1 where object masks are given). The ``k`` with the best mean InsDel wins.

        Args:
            probe: normalised images ``(B, 3, H, W)``, or a ``ProbeBatch`` (its labels and
                masks are used unless ``target``/``masks`` are given).
            target: classes (default: the probe's labels, else the predicted class).
            masks: object masks ``(B, H, W)`` for AUPR1 (optional).
            layer_cutoffs: the cutoffs to try (default ``0..L``).
            progress: show a progress bar over the cutoffs.
            step: pixels per Insertion/Deletion step (default one patch, the protocol's);
                larger steps make the sweep cheaper and coarser.

        Returns:
            One row per cutoff: ``{"layer_cutoff", "insertion", "deletion", "insdel"
            [, "aupr_fg"]}`` (means over the probe images).
        """
        images = getattr(probe, "images", probe)
        target = getattr(probe, "labels", None) if target is None else target
        masks = getattr(probe, "masks", None) if masks is None else masks
        cutoffs = list(range(self.depth + 1)) if layer_cutoffs is None else list(layer_cutoffs)
        bad = [k for k in cutoffs if not 0 <= k <= self.depth]
        if not cutoffs or bad:
            raise ValueError(f"layer_cutoffs must be ints in 0..{self.depth}, got {cutoffs}")
        if target is not None:
            target = check_target(target, len(images), self.classifier.num_classes, images.device)
        return sweep_cutoffs(self, self.classifier, cutoffs, images, target, masks, step, progress)

    # ------------------------------------------------------------------ set-up pieces
    def _score(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return target_score(logits, targets, self.score)

    def _blank_context(self, size, device, dtype) -> _BlankContext:
        self.last_blank = choose_blank(self.blank, self.classifier, size, self.mean, self.std, self.blank_seed, device, dtype)
        image = make_blank(self.last_blank, size, self.mean, self.std, self.blank_seed).to(device, dtype)
        states = vit.forward_states(self.model, image)
        logits = self.classifier.pooled_logits(vit.pool_final(self.model, states.states[-1]))
        final_normed = self.model.norm(states.states[-1][0, self.model.num_prefix_tokens:])
        return _BlankContext(states, logits, final_normed)

    def _warn_saturated(self, blank: _BlankContext, targets: torch.Tensor) -> None:
        warn_saturated_blank("CAAP", self.last_blank, blank.logits, targets, self._warned_classes)

    def _chunk(self, batch: int, rows: int, per_patch_elems: int) -> int:
        if self.chunk_size is not None:
            return self.chunk_size
        heads = self.model.blocks[0].attn.num_heads if len(self.model.blocks) else 1
        per_patch = 4 * 3 * batch * max(heads * rows * per_patch_elems, 1)
        return max(1, _CHUNK_BUDGET_BYTES // per_patch)

    # ------------------------------------------------------------------ constructions
    def _groups(self, grid):
        """Per patch: the patched members ``S(p)`` and the recomputed blank members ``R(p)``."""
        device = model_device_dtype(self.model)[0]
        s_idx, s_valid = selection_members(self.selection, grid, device)
        if self.construction != "windowed":
            return s_idx, s_valid, s_idx[:, :0], s_valid[:, :0]
        w_idx, w_valid = neighbourhoods(grid, self.window, "chebyshev", device)
        n = grid[0] * grid[1]
        # Padding slots repeat p, itself a member, so scattering True everywhere is exact.
        in_s = torch.zeros(n, n, dtype=torch.bool, device=device).scatter_(1, s_idx, True)
        r_valid = w_valid & ~torch.gather(in_s, 1, w_idx)
        # Compact R(p): real members first, padded with p (harmless, masked everywhere).
        order = torch.argsort((~r_valid).to(torch.int8), dim=1, stable=True)
        m = max(int(r_valid.sum(1).max()), 1)
        r_idx, r_valid = torch.gather(w_idx, 1, order)[:, :m], torch.gather(r_valid, 1, order)[:, :m]
        r_idx = torch.where(r_valid, r_idx, torch.arange(n, device=device)[:, None])
        return s_idx, s_valid, r_idx, r_valid

    def _grouped(self, source: vit.TokenStates, blank: _BlankContext, size, targets) -> torch.Tensor:
        """``parallel``, ``windowed`` and ``efficient``: per-patch groups over a frozen blank."""
        model, P = self.model, self.model.num_prefix_tokens
        grid = vit.grid_size(model, *size)
        n = grid[0] * grid[1]
        s_idx, s_valid, r_idx, r_valid = self._groups(grid)
        rows = P + r_idx.shape[1] + s_idx.shape[1]
        if self.construction == "efficient" and blank.stats is None:
            blank.stats = [_blank_statistics(q, kk, v, P) for q, kk, v in _blank_qkv(model, blank)]
        chunk = self._chunk(len(targets), rows, n if self.construction != "efficient" else rows)
        out = []
        for start in range(0, n, chunk):
            patches = torch.arange(start, min(start + chunk, n), device=targets.device)
            out.append(self._grouped_chunk(source, blank, patches, s_idx[patches], s_valid[patches],
                                           r_idx[patches], r_valid[patches], targets))
        return torch.cat(out, dim=1)

    def _grouped_chunk(self, source, blank, patches, s_idx, s_valid, r_idx, r_valid, targets):
        model, k = self.model, self.layer_cutoff
        P, L = model.num_prefix_tokens, self.depth
        B, c = source.states[0].shape[0], len(patches)
        ms, mr = s_idx.shape[1], r_idx.shape[1]
        n = blank.final_normed.shape[0]
        # Blank keys j inside the group's window W(p) = S(p) + R(p) are not frozen context.
        # Padding slots repeat p (a member of S(p)), so scattering True everywhere is exact.
        in_window = torch.zeros(c, n, dtype=torch.bool, device=patches.device)
        in_window.scatter_(1, s_idx, True).scatter_(1, r_idx, True)
        member_valid = torch.cat([s_valid.new_ones(c, P), r_valid, s_valid], 1)
        # Token positions of each group row in the full sequence (for E-CAAP's statistics).
        positions = torch.cat([torch.arange(P, device=patches.device).expand(c, P), P + r_idx, P + s_idx], 1)

        def take(states, idx):  # (B, T, ...) gathered at patch indices idx (c, m) -> (B, c, m, ...)
            return states[:, P + idx]

        prefix = source.states[0][:, :P].unsqueeze(1).expand(B, c, P, -1)
        recomputed = blank.states.states[0].expand(B, -1, -1)[:, P + r_idx]
        patched = None
        token_pool = model.global_pool == "token"
        for layer, block in enumerate(model.blocks):
            kb = blank.states.keys[layer][:, 0, P:]  # (H, N, hd)
            vb = blank.states.values[layer][:, 0, P:]
            last = layer == L - 1
            if layer < k:
                # S(p) holds the source's states: only prefix and R rows are computed; the
                # S(p) keys/values are the source's own.
                computed = torch.cat([prefix, recomputed], 2)
                q, kc, vc = vit.qkv(block, computed)
                ks = source.keys[layer][:, :, P + s_idx]  # (H, B, c, ms, hd)
                vs = source.values[layer][:, :, P + s_idx]
                keys, values = torch.cat([kc, ks], 3), torch.cat([vc, vs], 3)
                q_rows = slice(0, P + mr)
            else:
                if patched is None:
                    patched = take(source.states[layer], s_idx)
                computed = torch.cat([prefix, recomputed, patched], 2)
                q, keys, values = vit.qkv(block, computed)
                q_rows = slice(0, P + mr + ms)
            if computed.shape[2] == 0:
                continue
            if last and token_pool:
                # Only the class token is read after the last block.
                q, computed, q_rows = q[..., :1, :], computed[:, :, :1], slice(0, 1)
            if self.construction == "efficient":
                attended = _efficient_attention(q, keys, values, member_valid, blank.stats[layer], positions[:, q_rows], s_idx, s_valid)
            else:
                attended = _merged_attention(q, keys, values, member_valid, kb, vb, in_window)
            computed = vit.finish_block(block, computed, attended)
            if last and token_pool:
                prefix = computed
                break
            prefix, recomputed = computed[:, :, :P], computed[:, :, P:P + mr]
            if layer >= k:
                patched = computed[:, :, P + mr:]
        if token_pool:
            pooled = model.norm(prefix[:, :, 0])
        else:
            if patched is None:  # k = L: S(p) is pinned at the input of the final norm
                patched = take(source.states[L], s_idx)
            pooled = _hybrid_mean(model, blank.final_normed, patched, s_idx, s_valid, recomputed, r_idx, r_valid)
        logits = self.classifier.pooled_logits(pooled)  # (B, c, classes)
        return self._score(logits.flatten(0, 1), targets.repeat_interleave(c)).view(B, c)

    def _standard(self, source: vit.TokenStates, blank: _BlankContext, size, targets) -> torch.Tensor:
        """Textbook activation patching: only S(p) is overwritten, everything else recomputed."""
        model, k = self.model, self.layer_cutoff
        P, L = model.num_prefix_tokens, self.depth
        grid = vit.grid_size(model, *size)
        n = grid[0] * grid[1]
        s_idx, _ = selection_members(self.selection, grid, targets.device)
        B, T, D = source.states[0].shape
        chunk = self.chunk_size or max(1, _CHUNK_BUDGET_BYTES // (4 * 4 * B * T * 4 * D))
        out = []
        for start in range(0, n, chunk):
            idx = s_idx[start:start + chunk]  # padding repeats p, so duplicate writes agree
            c = len(idx)
            pos = (P + idx).view(1, c, -1, 1).expand(B, c, -1, D)

            def pin(x, layer):  # overwrite S(p) with the source's h_layer
                src = source.states[layer][:, P + idx]
                return x.view(B, c, T, D).scatter(2, pos, src).flatten(0, 1)

            x = blank.states.states[0].expand(B * c, T, D)
            for layer, block in enumerate(model.blocks):
                if layer <= k:
                    x = pin(x, layer)
                x = block(x)
            if k == L:
                x = pin(x, L)
            logits = self.classifier.pooled_logits(vit.pool_final(model, x))
            out.append(self._score(logits, targets.repeat_interleave(c)).view(B, c))
        return torch.cat(out, dim=1)


def _merged_attention(q, keys, values, member_valid, kb, vb, excluded):
    """Attention of group queries over (group members) + (frozen blank tokens outside W(p)).

    The two parts are merged by log-sum-exp with one common max, so no ``T x T`` mask is
    built per patch. Heads first: q (H, B, c, R, d); keys/values (H, B, c, G, d);
    member_valid (c, G); kb/vb (H, N, d) the blank's patch keys/values; excluded (c, N)
    the blank keys inside W(p). The blank part is one (H, B*c*R, d) x (H, d, N) product:
    a broadcast matmul against the shared blank keys would copy them B*c times.
    """
    H, B, c, R, d = q.shape
    neg = torch.finfo(torch.float32).min
    s_in = (q @ keys.transpose(-1, -2)).float().masked_fill_(~member_valid[:, None, :], neg)
    s_bl = torch.bmm(q.reshape(H, B * c * R, d), kb.transpose(1, 2)).float().view(H, B, c, R, -1)
    s_bl.masked_fill_(excluded[:, None, :], neg)
    m = torch.maximum(s_in.amax(-1, keepdim=True), s_bl.amax(-1, keepdim=True))
    e_in, e_bl = s_in.sub_(m).exp_(), s_bl.sub_(m).exp_()
    denom = e_in.sum(-1, keepdim=True) + e_bl.sum(-1, keepdim=True)
    num_bl = torch.bmm(e_bl.view(H, B * c * R, -1).to(vb.dtype), vb).view(H, B, c, R, d)
    num = (e_in.to(values.dtype) @ values).float() + num_bl.float()
    return (num / denom).to(values.dtype)


def _blank_qkv(model, blank: _BlankContext):
    """The blank context's queries, keys and values per block (batch dim dropped)."""
    for layer, block in enumerate(model.blocks):
        q, k, v = vit.qkv(block, blank.states.states[layer])
        yield q[:, 0], k[:, 0], v[:, 0]


def _blank_statistics(q, k, v, num_prefix: int):
    """E-CAAP's per-layer blank statistics over the blank's patch keys.

    For every query position ``i`` of the blank context: the max score ``m_i``, the
    exponentials ``E[i, j] = exp(q_i k_j - m_i)``, their sum ``Z_i`` and ``V_i = E_i @ v``.
    """
    kp, vp = k[:, num_prefix:].float(), v[:, num_prefix:].float()
    s = q.float() @ kp.transpose(-1, -2)  # (H, T, N)
    m = s.amax(-1)
    e = (s - m[..., None]).exp()
    return m, e, e.sum(-1), e @ vp, vp


def _efficient_attention(q, keys, values, member_valid, stats, positions, s_idx, s_valid):
    """E-CAAP: in-group scores are exact; the blank part is the blank context's own
    attention statistics at the row's position with the S(p) terms subtracted.

    Shapes as in :func:`_merged_attention`; positions (c, R) are the rows' token positions.
    """
    m_b, e_b, z_b, v_b, vp = stats  # (H, T), (H, T, N), (H, T), (H, T, d), (H, N, d)
    neg = torch.finfo(torch.float32).min
    s_in = (q @ keys.transpose(-1, -2)).float().masked_fill_(~member_valid[:, None, :], neg)
    h = e_b.shape[0]
    c, rows = positions.shape
    sel = s_idx[None, :, None, :].expand(h, c, rows, -1)
    e_sel = torch.gather(e_b[:, positions], 3, sel) * s_valid[None, :, None, :]  # (H, c, R, ms)
    z = (z_b[:, positions] - e_sel.sum(-1)).clamp_min(0)[:, None, ..., None]  # (H, 1, c, R, 1)
    v_sum = (v_b[:, positions] - e_sel @ vp[:, s_idx])[:, None]  # (H, 1, c, R, d)
    m_bl = m_b[:, positions][:, None, ..., None]
    m = torch.maximum(s_in.amax(-1, keepdim=True), m_bl)
    e_in = s_in.sub_(m).exp_()
    w_bl = (m_bl - m).exp()
    denom = e_in.sum(-1, keepdim=True) + w_bl * z
    num = (e_in.to(values.dtype) @ values).float() + w_bl * v_sum
    return (num / denom).to(values.dtype)


def _hybrid_mean(model, blank_normed, patched, s_idx, s_valid, recomputed, r_idx, r_valid):
    """``avg`` pooling of the hybrid final states: group rows at W(p), the blank elsewhere."""
    n = blank_normed.shape[0]
    total = blank_normed.sum(0)
    s_w = s_valid[None, :, :, None].to(patched.dtype)
    r_w = r_valid[None, :, :, None].to(patched.dtype)
    own = (model.norm(patched) * s_w).sum(2) + (model.norm(recomputed) * r_w).sum(2)
    replaced = (blank_normed[s_idx] * s_w[0]).sum(1) + (blank_normed[r_idx] * r_w[0]).sum(1)
    return (total - replaced + own) / n
