"""One layer's inputs or outputs over a whole calibration set, a mini-batch at a time.

Peak memory does not grow with the number of images: a network is resumed from the values
stored at the cut just before the wanted layer (:mod:`decouple.calibrate.segments`), kept per
mini-batch in memory while they fit under ``keep_bytes`` (:mod:`decouple.calibrate.spill`) and
as raw files in a temporary folder beyond. Each segment runs once over the set: calibration
costs one forward pass of each network. A model ``torch.fx`` cannot trace is re-run from its
input for every layer instead (time grows with depth, memory does not).
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

from ..nn import shards
from .segments import Segments, split
from .spill import Spilled, default_keep_bytes, release_memory

Source = Callable[[], Iterator[tuple[int, torch.Tensor]]]


def batches(images: torch.Tensor | Iterable, batch_size: int = 32, shard: bool = True) -> Source:
    """The calibration set as a re-iterable source of ``(index of the first image, batch)``.

    ``images`` is a tensor ``(n, C, H, W)`` or anything iterated afresh on each pass in the same
    order (a ``DataLoader`` without shuffling); items may be ``(images, labels)`` pairs. Under
    ``torchrun`` each process gets its own batches (:mod:`decouple.nn.shards`), indexed as in
    the whole set; ``shard=False`` gives every process all of them.
    """
    indexed = getattr(images, "indexed_batches", None)
    if indexed is not None:  # a part of a set (Split): indexed within the part
        return indexed(shard)
    if isinstance(images, torch.Tensor):
        starts = range(0, len(images), batch_size)
        return lambda: (
            (i, images[i : i + batch_size])
            for k, i in enumerate(starts)
            if not shard or shards.mine(k)
        )
    if shard and shards.world()[1] > 1:
        split = shards.my_loader(images)
        if split is not None:  # a sequential DataLoader: only this process's batches are read
            starts, loader = split
            return lambda: (
                (s, item[0] if isinstance(item, (tuple, list)) else item)
                for s, item in zip(starts, loader, strict=True)
            )

    def walk() -> Iterator[tuple[int, torch.Tensor]]:
        start = 0
        for k, item in enumerate(images):
            x = item[0] if isinstance(item, (tuple, list)) else item
            if not shard or shards.mine(k):
                yield start, x
            start += len(x)

    return walk


def count_images(images: torch.Tensor | Iterable) -> int | None:
    """How many images a calibration source holds, where it says (a tensor, a ``DataLoader``
    over a sized dataset, any sized collection of single images); else None."""
    if isinstance(images, torch.Tensor):
        return len(images)
    dataset = getattr(images, "dataset", None)
    try:
        return len(dataset) if dataset is not None else None
    except TypeError:
        return None


class _Stop(Exception):
    """Raised from a hook: the rest of the forward pass is not needed."""


def _capture(module: nn.Module, run: Callable[[], object], want: str) -> torch.Tensor:
    """Run ``run()`` until ``module`` is called; its first input (``"input"``) or its output."""
    got: list[torch.Tensor] = []

    def pre(mod, args):
        got.append(args[0])
        raise _Stop

    def post(mod, args, out):
        got.append(out)
        raise _Stop

    handle = (
        module.register_forward_pre_hook(pre)
        if want == "input"
        else module.register_forward_hook(post)
    )
    try:
        run()
    except _Stop:
        pass
    finally:
        handle.remove()
    if not got:
        raise RuntimeError("the layer was not called on the way")
    return got[0]


def forward_order(model: nn.Module, names: list[str], example: torch.Tensor) -> list[str]:
    """``names`` in the order one forward pass calls them (the order they must be refit in)."""
    seen: list[str] = []
    handles = [
        model.get_submodule(n).register_forward_pre_hook(
            lambda mod, args, n=n: seen.append(n) if n not in seen else None
        )
        for n in names
    ]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return seen + [n for n in names if n not in seen]


class LayerStream:
    """The inputs or outputs of ``model``'s named layers over ``source``, layer after layer.

    Ask for layers in forward order: the network is resumed past every layer already asked for,
    so changes to a layer (a refit) count from the next layer asked for on. Each segment
    (:mod:`decouple.calibrate.segments`) runs once per batch: a layer's input is read from what
    is stored at its segment's start, its output caught while the segment runs on.
    """

    def __init__(
        self,
        model: nn.Module,
        names: list[str],
        source: Source,
        device: torch.device | str | None = None,
        keep_bytes: int | None = None,
        spill_dir: str | None = None,
    ) -> None:
        self.model, self.source, self.device = model, source, device
        self.keep_bytes = default_keep_bytes() if keep_bytes is None else keep_bytes
        try:
            self.segments: Segments | None = split(model, names)
        except ValueError:
            self.segments = None
        self.current = 0  # the segment whose inputs the frontier holds
        # per batch: (index of its first image, {value name: tensor, spilled file or other})
        self.frontier: list[tuple[int, dict]] | None = None  # None: the source itself
        self._dir: str | None = None
        self._spill_root = spill_dir
        self._count = 0
        self._broken = False

    @property
    def resumes(self) -> bool:
        """Whether the network is resumed at cut points (else re-run from its input)."""
        return self.segments is not None

    def _move(self, x):
        return x.to(self.device) if self.device is not None and isinstance(x, torch.Tensor) else x

    def _load(self, item):
        return self._move(item.load() if isinstance(item, Spilled) else item)

    def _batches(self, feed: Iterator | None = None) -> Iterator[tuple[int, dict]]:
        """The frontier, or the source (``feed``: one reading of it) as one, batch by batch
        (stored, not loaded)."""
        if self.frontier is not None:
            yield from self.frontier
            return
        for start, x in self.source() if feed is None else feed:
            yield start, {self.segments.first: x}

    def _inputs(self) -> Iterator[tuple[int, torch.Tensor]]:
        for start, x in self.source():
            yield start, self._move(x)

    def _store(self, x, kept: int) -> tuple[object, int]:
        """``x`` kept in memory while ``kept`` bytes and it fit under ``keep_bytes``, else in a
        file; values other than tensors (sizes, tuples) stay in memory."""
        if not isinstance(x, torch.Tensor):
            return x, kept
        x = x.detach().contiguous()
        size = x.numel() * x.element_size()
        if kept + size <= self.keep_bytes:
            # A segment's output is its own (a value changed in place later is stored again);
            # only a view is copied, so that it does not keep a larger tensor alive.
            return (x.clone() if x._base is not None else x), kept + size
        if self._dir is None:
            self._dir = tempfile.mkdtemp(prefix="decouple-calib-", dir=self._spill_root)
        self._count += 1
        return Spilled.save(x.cpu(), Path(self._dir) / f"{self._count}.bin"), kept

    @staticmethod
    def _in_memory(values: dict) -> int:
        return sum(v.numel() * v.element_size() for v in values.values()
                   if isinstance(v, torch.Tensor))  # fmt: skip

    def _pass(self, capture: nn.Module | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """Run the current segment over every batch and move on past it; with ``capture``, yield
        that layer's output for each batch on the way."""
        for start, out in self._steps(capture):
            if capture is not None:
                yield start, out

    def _steps(
        self, capture: nn.Module | None = None, feed: Iterator | None = None
    ) -> Iterator[tuple[int, torch.Tensor | None]]:
        """:meth:`_pass`, yielding after every batch (``None`` without ``capture``)."""
        if self._broken:
            raise RuntimeError("a pass of this stream was abandoned halfway: start a new stream")
        segment = self.segments.parts[self.current]
        old = self.frontier
        kept = sum(self._in_memory(v) for _, v in old or ())
        new: list[tuple[int, dict]] = []
        got: list[torch.Tensor] = []
        handle = None
        if capture is not None:  # a clone: what runs after may change the output in place
            handle = capture.register_forward_hook(lambda m, i, o: got.append(o.detach().clone()))
        done = False
        try:
            for k, (start, values) in enumerate(self._batches(feed)):
                got.clear()
                with torch.no_grad():
                    out = segment.module(*(self._load(values[n]) for n in segment.takes))
                after = {n: v for n, v in values.items() if n not in segment.drops}
                # What this batch no longer needs goes now, not at the end of the pass: the
                # memory it held is there for the values the pass makes (fewer spill to disk).
                for n in segment.drops:
                    v = values.get(n)
                    if isinstance(v, torch.Tensor):
                        kept -= v.numel() * v.element_size()
                    elif isinstance(v, Spilled):
                        v.path.unlink(missing_ok=True)
                if old is not None:
                    old[k] = (start, after)  # the batch's old values, less what went
                del values
                for n, v in zip(segment.gives, out, strict=True):
                    after[n], kept = self._store(v, kept)
                new.append((start, after))
                if capture is not None and not got:
                    raise RuntimeError("the layer was not called on the way")
                yield start, (got[0] if capture is not None else None)
            done = True
        finally:
            if handle is not None:
                handle.remove()
            if done:
                self.frontier, self.current = new, self.current + 1
            else:  # the old values are partly gone: this stream cannot go on
                self._drop(new)
                self._drop(old)
                self.frontier, self._broken = None, True
            release_memory()

    def _before(self, name: str) -> bool:
        """Whether the first segment runs before ``name``'s input or output can be read."""
        return (
            self.resumes and self.frontier is None and not self._broken
            and self.current == 0 < self.segments.owner[name]
        )  # fmt: skip

    @staticmethod
    def _drop(frontier, keep=()) -> None:
        """Delete the files of ``frontier`` that ``keep`` does not hold too."""
        held = {v.path for _, values in keep for v in values.values() if isinstance(v, Spilled)}
        for _, values in frontier or ():
            for v in values.values():
                if isinstance(v, Spilled) and v.path not in held:
                    v.path.unlink(missing_ok=True)

    @torch.no_grad()
    def run(self, name: str, want: str = "input") -> Iterator[tuple[int, torch.Tensor]]:
        """``(index of the first image, the layer's input or output)`` for every batch."""
        module = self.model.get_submodule(name)
        if self._broken:
            raise RuntimeError("a pass of this stream was abandoned halfway: start a new stream")
        if self.segments is None:
            for start, x in self._inputs():
                yield start, _capture(module, lambda x=x: self.model(x), want)
            return
        owner = self.segments.owner[name]
        if self.current > owner:
            raise RuntimeError(f"{name} was asked for after a later layer: ask in forward order")
        while self.current < owner:
            for _ in self._pass():
                pass
        if want == "output":
            yield from self._pass(module)
            return
        value = self.segments.inputs[name]
        for start, values in self._batches():
            yield start, self._load(values[value])

    def close(self) -> None:
        self._drop(self.frontier)
        self.frontier = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> LayerStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Split:
    """One part of a calibration source split by image index: every ``every``-th image
    (``part="measure"``) or all the others (``part="decide"``), as a re-iterable source of batches.

    Images that choose and fit a plan must never be the ones that judge it; the split is by each
    image's position in the source, so it is the same on every pass.
    """

    PARTS = ("decide", "measure")

    def __init__(self, images: torch.Tensor | Iterable, part: str, every: int = 4) -> None:
        if part not in self.PARTS:
            raise ValueError(f"part must be one of {', '.join(self.PARTS)}; got {part!r}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 2:
            raise ValueError(f"every must be an integer >= 2; got {every!r}")
        self.images, self.part, self.every = images, part, every

    def mask(self, start: int, count: int) -> torch.Tensor:
        """Which of images ``start … start + count − 1`` belong to this part."""
        measure = (torch.arange(start, start + count) % self.every) == self.every - 1
        return measure if self.part == "measure" else ~measure

    def indexed_batches(self, shard: bool = True) -> Source:
        """This part as a source of ``(index within the part of the first image, batch)``:
        the part's images are numbered as if it were a set of its own."""

        def walk() -> Iterator[tuple[int, torch.Tensor]]:
            for start, x in batches(self.images, shard=shard)():
                keep = self.mask(start, len(x))
                if keep.any():
                    measured = start // self.every  # images of the measuring part before start
                    first = measured if self.part == "measure" else start - measured
                    yield first, x[keep.to(x.device)]

        return walk

    def __iter__(self) -> Iterator[torch.Tensor]:
        for _, x in self.indexed_batches()():
            yield x

    def count(self) -> int:
        """Images in this part (one pass over the source; over every process's share)."""
        return int(shards.all_sum(sum(len(x) for x in self))[0])


def advance_together(*wanted: tuple[LayerStream, str]) -> None:
    """Run the first segment of every ``(stream, first layer it will be asked for)`` over one
    reading of their common source, batch by batch in step.

    Both networks of a calibration start from the same images: read apart, every image would be
    loaded (JPEG decoding, resizing) once per network. In step, ``itertools.tee`` holds one
    batch at most. Streams that read the source themselves (their first layer's input is the
    source, or the model is re-run from its input for every layer) are left as they are.
    """
    ready = [s for s, name in wanted if s._before(name)]
    if len(ready) < 2 or any(s.source is not ready[0].source for s in ready):
        return
    feeds = list(itertools.tee(ready[0].source(), len(ready)))
    # A first segment that changes its input in place (x.sub_(mean)) must not change what
    # another stream reads: each gets its own copy.
    if any(s.segments.first in s.segments.parts[0].changes for s in ready):
        feeds = [((i, x.clone()) for i, x in f) for f in feeds]
    for _ in zip(*(s._steps(feed=f) for s, f in zip(ready, feeds, strict=True)), strict=True):
        pass
