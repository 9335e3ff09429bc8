"""The "auto" backend's in-context timing: which path a layer runs, per input shape.

Two races, decided the same way:
  * a float32 Linear: the Numba GEMM or BLAS (AutoBackend);
  * a reduced-precision QLinear: its int8 / bf16 kernel, or the float32 GEMM where that is faster on this CPU
    (AutoPrecision; the rule for when a layer may switch is in vitnp.layers).
Each (rows, K, N) -- for a QLinear, (kernel kind, rows, K, N) -- is decided once per process and shared by every
layer of that shape (the twelve blocks of a ViT have identical shapes, so timing once per shape is enough and keeps
every layer on the same choice): from this machine's stored decisions (autotune_store) when it has one, else by
timing the candidates as they run in a forward pass.  A decision the timed rounds agree on is stored for later
processes.  An auto layer's weight follows the decisions in the layout the chosen backend reads fastest, until
BLAS is chosen once (see AutoBackend).

The layers are used through their public face only: in_features, out_features, bias, run(backend, x, out,
epilogue), laid_out_for(backend), lay_out_for(backend), and the class called as cls(weight, bias, backend=...)
for a Linear; precision, kind, in_features, out_features and race_candidates(weight) for a QLinear.
"""
import os
import threading
import time

import numba
import numpy as np

from . import autotune_store, isa
from .elementwise import layernorm

AUTO_ROUNDS = 2   # timed rounds per shape, one after the other: a decision is stored only if they agree
AUTO_REPEATS = 3  # timed calls per backend and round
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

FLOAT32 = "fp32"  # the path a reduced-precision layer may take instead of its own kernel
# A reduced-precision kernel is kept only where its race time is below (1 - REDUCED_MIN_GAIN) times float32's.
# The race is a model of the forward pass, not the pass itself: on the AVX2 build the bf16 kernel won fc1 and fc2
# by 2-4% in their races while the forward pass that ran it was 4-9% slower than float32.  Where a reduced kernel
# pays (int8 and bf16 with VNNI / AVX512_BF16: 1.5-3x; int8 on AVX2: ~1.4x) a 10% bar changes nothing, and on a
# near tie float32 costs no accuracy (it multiplies by the same weight values).
REDUCED_MIN_GAIN = 0.10

# (rows, K, N) -> "numba" | "blas", and -> {backend: best seconds}: this process's decisions.
_auto_choice = {}
_auto_timings = {}
_auto_lock = threading.Lock()
# (kind, rows, K, N) -> the layer's precision | FLOAT32, and -> {path: best seconds}: the same for QLinear.
_path_choice = {}
_path_timings = {}
_path_lock = threading.Lock()


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


def choose(timed_round, pause=AUTO_CONFIRM_PAUSE_SECONDS, usual="numba", handicap=None):
    """Run AUTO_ROUNDS timed rounds (timed_round() -> {candidate: [seconds, ...]}), and one more after `pause`
    seconds when they agree on another candidate than the `usual` one (Numba; for a QLinear its own kernel) for
    a shape the usual one takes at least AUTO_CONFIRM_MIN_SECONDS on; returns decide() of all of them."""
    rounds = [timed_round() for _ in range(AUTO_ROUNDS)]
    choice, best, consistent = decide(rounds, usual, handicap)
    if choice != usual and consistent and best[usual] >= AUTO_CONFIRM_MIN_SECONDS:
        time.sleep(pause)
        rounds.append(timed_round())
        choice, best, consistent = decide(rounds, usual, handicap)
    return choice, best, consistent


def decide(rounds, usual="numba", handicap=None):
    """Timed rounds [{candidate: [seconds, ...]}, ...] -> (choice, {candidate: best seconds}, consistent).

    The choice is the candidate with the fastest call over all rounds (on a tie, the `usual` one), each
    candidate's times multiplied by handicap[candidate] (default 1) for the comparison only: a candidate that
    must win clearly to be worth it.  It is consistent when every round, on its own, picks the same candidate:
    another process that ran through one round's block (a preempted thread stalls a whole Numba parallel region)
    makes the rounds disagree, and such a decision is used by this process but not stored, so the next process
    times again instead of keeping a 2x slower path.
    """
    handicap = handicap or {}
    weighed = lambda name, seconds: seconds * handicap.get(name, 1.0)  # noqa: E731
    best = {name: min(t for times in rounds for t in times[name]) for name in rounds[0]}
    winners = {min(times, key=lambda name: weighed(name, min(times[name]))) for times in rounds}
    choice = min(best, key=lambda name: (weighed(name, best[name]), name != usual))
    return choice, best, len(winners) == 1


def machine_key():
    """Where this process's decisions are filed: CPU, ISA, thread count, BLAS, pool settings."""
    return autotune_store.machine_key(numba.get_num_threads(), isa.ISA)


def decisions(in_features, out_features):
    """{rows: {"backend": choice, "<backend>_ms": best time, ...}} decided so far for this (K, N)."""
    shapes = {}
    for (rows, k, n), choice in sorted(_auto_choice.items()):
        if (k, n) == (in_features, out_features):
            timing = _auto_timings.get((rows, k, n), {})
            shapes[rows] = {"backend": choice, **{f"{name}_ms": round(t * 1e3, 3) for name, t in timing.items()}}
    return shapes


def path_decisions(kind, in_features, out_features):
    """{rows: {"path": choice, "<path>_ms": best time, ...}} decided so far for this kernel kind and (K, N)."""
    shapes = {}
    for (k_kind, rows, k, n), choice in sorted(_path_choice.items()):
        if (k_kind, k, n) == (kind, in_features, out_features):
            timing = _path_timings.get((kind, rows, k, n), {})
            shapes[rows] = {"path": choice, **{f"{name}_ms": round(t * 1e3, 3) for name, t in timing.items()}}
    return shapes


class AutoBackend:
    """The "auto" backend of one layer: the backend per row count, and where the layer's weight lives.

    The weight starts in Numba's panels (the usual winner; packed at load, it lands in memory as numba's does),
    or as (K, N) when this machine's stored decisions for the shape include BLAS.  Each decision then moves it
    to the layout the chosen backend reads, until BLAS is chosen once: from then on it stays (K, N), which the
    Numba GEMM reads in place too, so a layer's weight is never converted back and forth.
    """

    def __init__(self, in_features, out_features):
        self.in_features, self.out_features = in_features, out_features
        self.settled = False  # BLAS has been chosen: the layout no longer changes

    def starting_backend(self):
        """The backend whose layout the layer's weight is laid out in at load."""
        stored = autotune_store.choices_for(machine_key(), self.in_features, self.out_features)
        return "numba" if stored <= {"numba"} else "blas"

    def backend_for(self, layer, rows):
        """The backend for an input of `rows` rows (decided on first use of the shape); moves layer's weight."""
        key = (int(rows), self.in_features, self.out_features)
        choice = _decided(_auto_choice, _auto_lock, key, _stored_or_timed_choice, layer)
        if not self.settled and (choice == "blas" or not layer.laid_out_for("numba")):
            self.follow(layer, choice)
        return choice

    def follow(self, layer, choice):
        """Lay the layer's weight out for `choice`, unless BLAS was chosen before."""
        with _auto_lock:
            if self.settled:
                return
            layer.lay_out_for(choice)
            self.settled = choice == "blas"


class AutoPrecision:
    """The "auto" backend of one reduced-precision layer: per row count, whether its own kernel or the float32
    GEMM is the faster path on this CPU (decided per (kind, rows, K, N) as above; QLinear acts on it)."""

    def __init__(self, kind, in_features, out_features):
        self.kind = kind
        self.in_features, self.out_features = in_features, out_features

    def path_for(self, layer, rows):
        """`layer.precision` or FLOAT32: the faster path for an input of `rows` rows (decided on first use)."""
        key = (self.kind, int(rows), self.in_features, self.out_features)
        return _decided(_path_choice, _path_lock, key, _stored_or_timed_path, layer)


def _decided(choices, lock, key, decide, layer):
    """choices[key], or decide(layer, key) (which files it in choices) the first time: one thread decides a
    shape while the others wait for it; once decided, a lookup takes no lock (every forward pass asks)."""
    choice = choices.get(key)
    if choice is None:
        with lock:
            choice = choices.get(key)
            if choice is None:
                choice = decide(layer, key)
    return choice


def _stored_or_timed_choice(layer, key):
    machine = machine_key()
    stored = autotune_store.load(machine, key, ("numba", "blas"))
    if stored is not None:
        _auto_choice[key], _auto_timings[key] = stored
        return stored[0]
    choice, consistent = _time_backends(layer, key)
    if consistent:
        autotune_store.save(machine, key, choice, _auto_timings[key])
    return choice


def _stored_or_timed_path(layer, key):
    machine = machine_key()
    paths = (layer.precision, FLOAT32)
    handicap = {layer.precision: 1 / (1 - REDUCED_MIN_GAIN)}
    stored = autotune_store.load(machine, key, paths)
    if stored is not None:
        choice, timings = stored
        if set(timings) == set(paths) and all(isinstance(timings[path], (int, float)) for path in paths):
            # the stored race, judged by this rule (a decision stored before the rule changed may differ)
            choice = decide([{path: [timings[path]] for path in paths}], layer.precision, handicap)[0]
        _path_choice[key], _path_timings[key] = choice, timings
        return choice
    choice, best, consistent = choose(path_round(layer, key), usual=layer.precision, handicap=handicap)
    _path_timings[key], _path_choice[key] = best, choice
    if consistent:
        autotune_store.save(machine, key, choice, best)
    return choice


def synthetic_weight(n, k):
    """An (n, k) float32 weight to time a layer's candidates on: uniform values, as good as any for timing (the
    kernels' speed does not depend on them) and a sixth of the cost of normal ones (a cold ViT-B run draws ten)."""
    return np.random.default_rng(0).random((n, k), dtype=np.float32)


def path_round(layer, key):
    """timed_round() for choose(): the reduced-precision layer's kernel against the float32 GEMM (each built by
    layer.race_candidates on a synthetic weight of the layer's shape), in context, the reduced kernel first, each
    followed by itself: a model whose projections run one path against one whose projections run the other.
    (Followed by the reduced kernel, the float32 GEMM paid for the switch between the two: on the AVX2 build the
    bf16 kernel then won layers that made the whole forward pass slower than float32.)"""
    _, rows, k, n = key
    weight = synthetic_weight(n, k)
    weight.setflags(write=False)  # read-only, as a checkpoint's mapped tensors are: the signatures loading compiles
    candidates = layer.race_candidates(weight)  # {precision: run(x, out), FLOAT32: run(x, out)}
    del weight
    return in_context_round(candidates, candidates, rows, k, n)


def in_context_round(candidates, followers, rows, k, n):
    """A timed_round() for choose(): each candidate (name -> run(x, out), in order) as it runs in a forward pass:
    between Numba parallel regions, the LayerNorm before it and followers[name] (a GEMM of the same shape) after
    it.

    Numba's OpenMP pool and OpenBLAS's pool each spin for a while after their work (OpenBLAS ~60 ms by
    default, unless OPENBLAS_THREAD_TIMEOUT was set before numpy loaded), and a spinning pool takes
    cores from the kernels that follow.  So what a BLAS call costs in a forward pass includes the slowdown
    of the Numba kernels after it; the follower after each candidate puts that in the candidate's time.  Each
    round times the candidates once the pools are idle, in their order, so a BLAS candidate placed last never
    puts its after-effects in another's time (and a win by another than the usual one may be timed once more:
    see choose).  Each candidate runs once here first (compile / warm up).
    """
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, k), dtype=np.float32)
    out = np.empty((rows, n), np.float32)
    after = np.empty_like(out)
    normed = np.empty_like(x)
    gamma, beta = np.ones(k, np.float32), np.zeros(k, np.float32)

    def in_context(name):
        layernorm(x, gamma, beta, 1e-6, normed)
        candidates[name](normed, out)
        followers[name](normed, after)

    for name in candidates:
        in_context(name)

    def timed_round():
        # Start on idle cores: the warm-up, the last round, or the caller's own BLAS calls may still have
        # a pool spinning (settle waits for it).  Once per round serves every block: the first makes no BLAS
        # call, so the BLAS block too starts with OpenBLAS's pool idle; Numba's pool spins only a few
        # milliseconds, and every BLAS repetition follows Numba kernels anyway (the same-shape GEMM that closes
        # the one before), as in a forward pass.
        settle()
        times = {}
        for name in candidates:
            times[name] = []
            for _ in range(AUTO_REPEATS):
                start = time.perf_counter()
                in_context(name)
                times[name].append(time.perf_counter() - start)
        return times

    return timed_round


def _time_backends(layer, key):
    """Time both backends on a synthetic weight of the layer's shape (and its bias), each in the layout it would
    use (the layer's own weight is in only one of them), in context (in_context_round), numba's first, each
    followed by a Numba GEMM of the same shape.  The faster in context is chosen, on any CPU and ISA; returns
    (choice, whether the rounds agreed: see decide)."""
    rows, k, n = key
    weight = synthetic_weight(n, k)
    layers = {name: type(layer)(weight, layer.bias, backend=name) for name in ("numba", "blas")}
    del weight
    candidates = {name: (lambda x, out, name=name: layers[name].run(name, x, out, "none")) for name in layers}
    choice, best, consistent = choose(in_context_round(candidates, dict.fromkeys(candidates, candidates["numba"]),
                                                       rows, k, n))
    _auto_timings[key] = best
    _auto_choice[key] = choice
    return choice, consistent
