"""Linear layer (x @ W^T + b) with a NumPy/BLAS backend, a Numba backend and per-shape auto selection."""
import operator
import os
import threading
import time

import numba
import numpy as np

from . import autotune_store, isa
from . import gemm as _gemm
from .elementwise import check_f32_contiguous, layernorm

BACKENDS = ("auto", "numba", "blas")
K_BY_N = "k_by_n"   # (K, N) C-contiguous: read by BLAS and (in place) by the Numba GEMM
PANELS = "panels"   # gemm.pack_weight layout: Numba GEMM only
AUTO_ROUNDS = 2   # timed rounds per shape, one after the other: a decision is stored only if they agree
AUTO_REPEATS = 3  # timed calls per backend and round
_PACKABLE = (np.dtype(np.float32),)  # Numba has no float16 arithmetic: those go through a float32 transpose
# > OpenBLAS's default worker spin, 2**28 TSC ticks (0.10 s with a 2.6 GHz TSC, 0.27 s at 1 GHz), in effect when
# numpy loaded before vitnp: each timed block starts on idle cores.  (At 0.1 s a still-spinning pool once made
# a 1-row GEMM time 1.5 ms on Numba against its idle 0.23 ms, and BLAS was chosen and stored.)
AUTO_SETTLE_SECONDS = 0.3
# A BLAS win for a shape whose Numba time is at least AUTO_CONFIRM_MIN_SECONDS is timed once more after this pause
# before it counts.  Such a stored decision costs every later process that shape's Numba speed (one wrong 197-row
# decision made a whole ViT-B forward pass 2.5x slower), and another program holding a core makes the Numba GEMM,
# whose parallel region waits for a preempted thread, 3-4x slower while BLAS loses about 10%: two back-to-back
# rounds can then agree on BLAS (a table-2 benchmark run stored BLAS for ViT-B's 197x768x768 after timing Numba at
# 7.4 ms there, against its 1.9 ms).  Shorter shapes skip it: a small model's first run would otherwise wait out a
# pause per shape (`vitnp classify --model bundled:digits`, empty store: 0.75 s, and 11-12 s with a 1 s pause for
# its 10 BLAS wins, all under 0.03 ms).
AUTO_CONFIRM_PAUSE_SECONDS = 0.5
AUTO_CONFIRM_MIN_SECONDS = 1e-3


# (M, K, N) -> "numba" | "blas", shared by all Linear layers: the twelve blocks of a ViT have identical
# shapes, so timing once per shape is enough and keeps every layer on the same choice.
_auto_choice = {}
_auto_timings = {}
_auto_lock = threading.Lock()
_local = threading.local()


def settle(limit=AUTO_SETTLE_SECONDS):
    """Wait until no other thread of this process is running (the Numba and OpenBLAS pools have stopped
    spinning after their last call), or `limit` seconds, whichever comes first: a timed block then starts on
    idle cores.  Where /proc/self/task cannot be read, or another thread keeps running, this is a plain
    sleep of `limit`."""
    deadline = time.perf_counter() + limit
    me = str(threading.get_native_id())
    while time.perf_counter() < deadline:
        try:
            running = False
            for task in os.listdir("/proc/self/task"):
                if task != me:
                    with open(f"/proc/self/task/{task}/stat", "rb") as f:
                        stat = f.read()
                    if stat[stat.rindex(b")") + 2:stat.rindex(b")") + 3] == b"R":
                        running = True
                        break
        except (OSError, ValueError):
            running = True
        if not running:
            return
        time.sleep(0.001)


def choose(timed_round, pause=AUTO_CONFIRM_PAUSE_SECONDS):
    """Run AUTO_ROUNDS timed rounds (timed_round() -> {backend: [seconds, ...]}), and one more after `pause`
    seconds when they agree on BLAS for a shape Numba takes at least AUTO_CONFIRM_MIN_SECONDS on; returns
    decide() of all of them."""
    rounds = [timed_round() for _ in range(AUTO_ROUNDS)]
    choice, best, consistent = decide(rounds)
    if choice == "blas" and consistent and best["numba"] >= AUTO_CONFIRM_MIN_SECONDS:
        time.sleep(pause)
        rounds.append(timed_round())
        choice, best, consistent = decide(rounds)
    return choice, best, consistent


def decide(rounds):
    """Timed rounds [{backend: [seconds, ...]}, ...] -> (choice, {backend: best seconds}, consistent).

    The choice is the backend with the fastest call over all rounds.  It is consistent when every round,
    on its own, picks the same backend: another process that ran through one round's block (a preempted
    thread stalls a whole Numba parallel region) makes the rounds disagree, and such a decision is used by
    this process but not stored, so the next process times again instead of keeping a 2x slower backend.
    """
    best = {name: min(t for times in rounds for t in times[name]) for name in rounds[0]}
    winners = {min(times, key=lambda name: min(times[name])) for times in rounds}
    choice = "blas" if best["blas"] < best["numba"] else "numba"
    return choice, best, len(winners) == 1


class Linear:
    """y = x @ W^T + b for a torch-layout weight W (N, K).

    The layer holds exactly one float32 copy of the weight, in the layout its backend reads fastest:
      * "blas": (K, N) C-contiguous, which numpy's matmul hands to sgemm without copying;
      * "numba": the GEMM micro-kernel's panel layout (gemm.pack_weight: NR-column panels, each stored
        k row after k row), so every B panel streams sequentially from DRAM instead of as 128-byte runs
        4-12 KiB apart (ViT-B fc1 at batch 1: 15% faster);
      * "auto": starts as panels, like "numba" (the usual winner; packed at load, the weight lands in memory
        as numba's does), or as (K, N) when this machine's stored decisions for the shape include BLAS;
        should a row count pick BLAS it returns to (K, N) for good (the Numba GEMM reads that layout in
        place too), so a layer converts at most once.
    """

    def __init__(self, weight, bias=None, backend="auto"):
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
        weight = np.asarray(weight)
        if weight.ndim != 2 or weight.dtype.kind != "f":
            raise TypeError(f"weight must be a 2-D float array (out_features, in_features), got "
                            f"{weight.dtype} {weight.shape}")
        self.out_features, self.in_features = weight.shape
        self.backend = backend
        # (layout, array) swapped as one attribute, so a concurrent call sees a consistent pair.  Packed
        # straight from (N, K) unless the layer will run BLAS for some row count (and so end as (K, N)):
        # each weight is laid out once, at load, never in the middle of a forward pass.
        if backend == "numba" or (backend == "auto" and self._stored_choices() <= {"numba"}):
            self._weight = (PANELS, _gemm.pack_weight_nk(weight) if weight.dtype in _PACKABLE
                            else _gemm.pack_weight(_transpose_to_f32(weight)))
        else:
            self._weight = (K_BY_N, _transpose_to_f32(weight))
        self._layout_final = backend != "auto"
        if bias is None:
            self.bias = None
        else:
            bias = np.asarray(bias)
            if bias.shape != (self.out_features,):
                raise ValueError(f"bias must have shape ({self.out_features},), got {bias.shape}")
            self.bias = np.ascontiguousarray(bias, dtype=np.float32)

    # -- selection -------------------------------------------------------------------------------
    def backend_for(self, rows):
        """The backend used for an input with `rows` rows (times both on first use when auto)."""
        if self.backend != "auto":
            return self.backend
        key = (int(rows), self.in_features, self.out_features)
        choice = _auto_choice.get(key)
        if choice is None:
            with _auto_lock:
                choice = _auto_choice.get(key)
                if choice is None:
                    choice = self._stored_or_timed_choice(key)
        if not self._layout_final and (choice == "blas" or self._weight[0] == K_BY_N):
            self._adapt_layout(choice)
        return choice

    def _adapt_layout(self, choice):
        with _auto_lock:
            layout, array = self._weight
            if self._layout_final:
                return
            if choice == "numba" and layout == K_BY_N:
                self._weight = (PANELS, _gemm.pack_weight(array))
            elif choice == "blas" and layout == PANELS:
                self._weight = (K_BY_N, _gemm.unpack_weight(array, self.in_features, self.out_features))
                self._layout_final = True
            elif choice == "blas":
                self._layout_final = True

    def _stored_choices(self):
        """The backends this machine's stored decisions chose for this layer's (K, N), over all row counts."""
        return autotune_store.choices_for(_machine_key(), self.in_features, self.out_features)

    def _stored_or_timed_choice(self, key):
        machine = _machine_key()
        stored = autotune_store.load(machine, key)
        if stored is not None:
            _auto_choice[key], _auto_timings[key] = stored
            return stored[0]
        choice, consistent = self._time_backends(key)
        if consistent:
            autotune_store.save(machine, key, choice, _auto_timings[key])
        return choice

    def _time_backends(self, key):
        """Time both backends on a synthetic weight of this shape, each in the layout it would use (the
        layer's own weight is in only one of them), and each as it runs in a forward pass: between Numba
        parallel regions, the LayerNorm before it and a Numba GEMM of the same shape after it.

        Numba's OpenMP pool and OpenBLAS's pool each spin for a while after their work (OpenBLAS ~60 ms by
        default, unless OPENBLAS_THREAD_TIMEOUT was set before numpy loaded), and a spinning pool takes
        cores from the kernels that follow.  So what a BLAS call costs in a forward pass includes the slowdown
        of the Numba kernels after it; the same-shape Numba GEMM after each candidate puts that in the
        candidate's time.  In each of AUTO_ROUNDS rounds both are timed once the pools are idle, numba's first,
        so BLAS's after-effects never land in numba's time (and a BLAS win may be timed once more: see choose).
        The faster in context is chosen, on any CPU and ISA; returns (choice, whether the rounds agreed: see
        decide).
        """
        rows = key[0]
        rng = np.random.default_rng(0)
        x = rng.standard_normal((rows, self.in_features), dtype=np.float32)
        out = np.empty((rows, self.out_features), np.float32)
        after = np.empty_like(out)
        weight_t = rng.standard_normal((self.in_features, self.out_features), dtype=np.float32)
        packed = (PANELS, _gemm.pack_weight(weight_t))
        candidates = {"numba": packed, "blas": (K_BY_N, weight_t)}  # this order: see settle() below
        normed = np.empty_like(x)
        gamma, beta = np.ones(self.in_features, np.float32), np.zeros(self.in_features, np.float32)

        def in_context(name, weight):
            layernorm(x, gamma, beta, 1e-6, normed)
            self._run(name, weight, normed, out, "none")
            self._run("numba", packed, normed, after, "none")

        for name, weight in candidates.items():
            in_context(name, weight)  # compile / warm up

        def timed_round():
            # Start on idle cores: the warm-up, the last round, or the caller's own BLAS calls may still have
            # a pool spinning (settle waits for it).  Once per round serves both blocks: numba's comes first and
            # makes no BLAS call, so the BLAS block too starts with OpenBLAS's pool idle; Numba's pool spins
            # only a few milliseconds, and every BLAS repetition follows Numba kernels anyway (the same-shape
            # GEMM that closes the one before), as in a forward pass.
            settle()
            times = {}
            for name, weight in candidates.items():  # numba, then blas
                times[name] = []
                for _ in range(AUTO_REPEATS):
                    start = time.perf_counter()
                    in_context(name, weight)
                    times[name].append(time.perf_counter() - start)
            return times

        choice, best, consistent = choose(timed_round)
        _auto_timings[key] = best
        _auto_choice[key] = choice
        return choice, consistent

    # -- compute ---------------------------------------------------------------------------------
    column_step = _gemm.NR  # a column range starts on a multiple of this (a whole panel of the packed weight)

    def __call__(self, x, out, epilogue="none", columns=None):
        """out (=|+=) epilogue(x @ W^T + b); with columns=(start, stop), only out[:, start:stop] is computed
        and the rest of out is left as it is (start a multiple of column_step)."""
        columns = check_layer_call(self, x, out, epilogue, _gemm.EPILOGUES, columns)
        backend = self.backend_for(x.shape[0])
        self._run(backend, self._weight, x, out, epilogue, columns)
        return out

    def _run(self, backend, weight, x, out, epilogue, columns=None):
        layout, array = weight
        if layout == PANELS:
            _gemm.gemm_packed(x, array, self.out_features, self.bias, out, epilogue, columns)
        elif backend == "numba":
            _gemm.gemm(x, array, self.bias, out, epilogue, columns)
        else:
            self._run_blas(array, x, out, epilogue, columns)

    @property
    def weight_layout(self):
        return self._weight[0]

    @property
    def weight_array(self):
        """The one weight-sized array the layer holds (layout: `weight_layout`)."""
        return self._weight[1]

    def _run_blas(self, weight_t, x, out, epilogue, columns=None):
        has_bias = self.bias is not None
        bias = self.bias if has_bias else _gemm.NO_BIAS
        start, stop = (0, self.out_features) if columns is None else columns
        if columns is not None:  # (K, N) and (M, N) column slices: strided, still sgemm's operands as they are
            weight_t = weight_t[:, start:stop]
        if epilogue == "add":
            product = _blas_scratch((out.shape[0], stop - start))
            np.matmul(x, weight_t, out=product)
            _gemm.add_product_inplace(out, product, bias, has_bias, start)
        else:
            np.matmul(x, weight_t, out=out if columns is None else out[:, start:stop])
            if has_bias or epilogue == "gelu":
                _gemm.apply_epilogue_inplace(out, bias, has_bias, _gemm.EPILOGUES[epilogue], start, stop)

    def report(self):
        """Shapes, backend setting and, for auto, the per-row-count choices and timings seen so far."""
        shapes = {}
        for (rows, k, n), choice in sorted(_auto_choice.items()):
            if (k, n) == (self.in_features, self.out_features):
                timing = _auto_timings.get((rows, k, n), {})
                shapes[rows] = {"backend": choice,
                                **{f"{name}_ms": round(t * 1e3, 3) for name, t in timing.items()}}
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, "backend": self.backend, "auto_choices": shapes,
                "weight_layout": self.weight_layout, "weight_bytes": int(self.weight_array.nbytes)}

    def __repr__(self):
        return f"Linear(in_features={self.in_features}, out_features={self.out_features}, backend={self.backend!r})"


def check_layer_call(layer, x, out, epilogue, epilogues, columns=None):
    """The checks every layer call makes (Linear and QLinear alike); errors name the layer's class.
    Returns the column range as (start, stop) ints, or None for all columns."""
    name = type(layer).__name__
    check_f32_contiguous(x, "x")
    check_f32_contiguous(out, "out")
    if x.ndim != 2 or x.shape[1] != layer.in_features:
        raise ValueError(f"{name}: x must be (M, {layer.in_features}), got {x.shape}")
    if out.shape != (x.shape[0], layer.out_features):
        raise ValueError(f"{name}: out must be {(x.shape[0], layer.out_features)}, got {out.shape}")
    if epilogue not in epilogues:
        raise ValueError(f"unknown epilogue {epilogue!r}; expected one of {tuple(epilogues)}")
    if np.may_share_memory(x, out):
        raise ValueError(f"{name}: out must not overlap x (the product is written while x is read)")
    if columns is None:
        return None
    try:
        start, stop = (operator.index(v) for v in columns)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: columns must be a (start, stop) pair of ints, got {columns!r}") from None
    if not 0 <= start <= stop <= layer.out_features or start % layer.column_step:
        raise ValueError(f"{name}: columns must satisfy 0 <= start <= stop <= {layer.out_features} with start a "
                         f"multiple of {layer.column_step}, got {columns!r}")
    return start, stop


def _machine_key():
    """Where this process's auto decisions are filed: CPU, ISA, thread count, BLAS, pool settings."""
    return autotune_store.machine_key(numba.get_num_threads(), isa.ISA)


def _transpose_to_f32(weight):
    """(N, K) any-float (possibly read-only mmap) -> (K, N) float32 C-contiguous, without a float32 temp."""
    n, k = weight.shape
    out = np.empty((k, n), np.float32)
    block = 256  # transposing in tiles keeps both source rows and destination rows cache-resident
    for r in range(0, n, block):
        np.copyto(out[:, r:r + block], weight[r:r + block].T, casting="same_kind")
    return out


def _blas_scratch(shape):
    """Grow-only per-thread buffer for the BLAS path's residual product."""
    size = shape[0] * shape[1]
    buf = getattr(_local, "product", None)
    if buf is None or buf.size < size:
        buf = np.empty(size, np.float32)
        _local.product = buf
    return buf[:size].reshape(shape)
