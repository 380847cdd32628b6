"""Recovery by logit distillation: the pruned student learns the dense teacher's next-token distribution.

The teacher's top-k log-probabilities and its tail mass (the representation of a validation bundle) are computed
once, before pruning, chunk by chunk into files on disk (`TeacherCache`), so neither all teacher logits nor the
teacher itself need to stay in memory while the student trains. The loss is KL(teacher ‖ student) over the top-k
tokens plus the tail, mixed with the cross-entropy of the text's own next tokens (`recovery_loss`). Every weight
of the decoder layers is trained (full fine-tuning of the kept weights); the embeddings and the output head stay as
they are, so the exported shape, and the planner's cost model, do not change.

Training sequences are windows spread evenly over the recovery texts (texts.recovery_texts: broader than the
calibration text and free of every evaluation text), an equal share from each; a few are held out, and the loss
on them is the stop rule. Ctrl-C or SIGTERM ends the current step, then writes a checkpoint; the same run started
again resumes from it and gives the same weights as a run that was never interrupted.
"""

from __future__ import annotations

import hashlib
import json
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from edgeprune.core.atomic import atomic_output
from edgeprune.core.errors import EdgepruneError
from edgeprune.core.texts import Text

Progress = Callable[[str], None]
CHARS_PER_TOKEN = 8  # characters read per wanted token of a window: more than any tokenizer needs on English
# The learning rate of low-rank recovery (DistillOptions.lora_rank), measured at rank 16 on both real models (see
# DistillOptions): one rate that recovers both, where training every weight wants 1e-4 on SmolLM2 (2e-5 won back
# about half as much there) and a fifth of it on Gemma 3 270M (1e-4 widened its in-domain gap).
LORA_LEARNING_RATE = 1e-3


@dataclass(frozen=True)
class DistillOptions:
    """How long and how hard to distil, per pruning step. Measured on SmolLM2-135M at 30% of decoder parameters
    removed through MLP channels, then on Gemma 3 270M, against both held-out texts (odd reference topics; The
    Tempest) and the recovery texts free of both (texts.recovery_texts). Torch PPL, 6 chunks of 512 tokens, on a
    2-core AVX2-only EPYC, every run 40 steps of 4 windows of 256 tokens (SmolLM2 one-shot 17.18 / 107.01, dense
    13.38 / 37.65; "won back" is the share of the one-shot model's PPL gap to the dense model):
    - KL to the teacher's top-k alone, every weight at 1e-4: 16.01 / 72.38, 31% / 50% won back. Each lever tried on
      it moved little: lr 2e-5 17% / 36%; warm-up then cosine 30% / 51%; the teacher's hidden states matched too
      31% / 49%; twice the reference topics' share of windows 29% / 48%; rank-16 adapters (lora_rank) at 1e-3 27% /
      49%, rank 64 24% / 52%; only the MLP weights trained 27% / 45%; a ridge refit afterwards undid it (8% / 33%);
      120 steps (llama.cpp, 10 chunks) 35% / 65%.
    - Half the loss on the windows' own next tokens (label_weight 0.5): 14.34 / 67.09, 75% / 58% won back (held-out
      KL to the teacher 0.594 against 0.543: the student leaves the teacher where the text disagrees with it).
      A quarter (0.25): 14.83 / 68.01, 62% / 56%. Part of the gain is adaptation to the recovery texts, which the
      dense model gets too: trained the same way it goes 13.38 / 37.65 to 11.28 / 33.42. Against the unpruned
      model, which is what a user ships instead, the pruned one still wins back three quarters of the gap.
    40 steps, with the teacher's pass over their windows, fit 15 minutes on that machine (a step 12-13 s, the
    pass about 4 min); 120 steps took 38. Gemma 3 270M (20 steps; one-shot 16.92 / 114.00, dense 13.01 / 42.55)
    wants a fifth of SmolLM2's rate: with labels at 2e-5 14.93 / 72.60 (51% / 58%), at 1e-4 18.03 / 77.38 (the
    in-domain gap 28% wider; The Tempest's 51% won back); KL alone at 2e-5 24% / 54%, adapters at 1e-3 22% /
    53%. Adapters save 13% of a step on SmolLM2 and nothing on Gemma, whose 262k-token head dominates a step. The
    stop rule measures the training loss on the held-out windows."""

    steps: int = 40
    batch_size: int = 4
    seq_len: int = 256
    learning_rate: float = 1e-4
    top_k: int = 64
    held_out: int = 8  # held-out windows for the stop rule
    eval_every: int = 20  # steps between held-out loss measurements
    patience: int = 2  # held-out measurements without improvement before stopping
    seed: int = 0
    lora_rank: int = 0  # 0: train every decoder weight; r: train rank-r adapters on its projections, merged at the end
    label_weight: float = 0.5  # the loss's share given to the windows' own next tokens (recovery_loss)

    def validate(self) -> None:
        if self.lora_rank < 0:
            raise EdgepruneError(f"distillation lora_rank must be 0 (every weight) or more, got {self.lora_rank}")
        for name in ("steps", "batch_size", "seq_len", "top_k", "held_out", "eval_every", "patience"):
            if getattr(self, name) < 1:
                raise EdgepruneError(f"distillation {name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.label_weight <= 1:
            raise EdgepruneError(f"distillation label_weight must be within 0 to 1, got {self.label_weight}")
        if not self.learning_rate > 0:
            raise EdgepruneError(f"distillation learning rate must be positive, got {self.learning_rate}")


@dataclass
class DistillResult:
    steps: int  # steps trained in all, across resumed runs
    stopped_early: bool
    resumed_from: int  # the step a checkpoint gave back (0: a fresh run)
    seconds: float  # this run's
    held_out_loss: list[float]  # the stop rule's measurements, first before any step
    train_loss: list[float]
    kept_step: int  # the step whose weights the student ends with: the best held-out loss


def windows(texts: list[Text], tokenizer, options: DistillOptions, bos_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Training and held-out token windows, taken from the texts in turn (each text gets an equal share, however
    long it is) and spread evenly over each one; the held-out ones are every so many of them."""
    count = options.steps * options.batch_size + options.held_out
    width = options.seq_len * CHARS_PER_TOKEN
    per_text = -(-count // len(texts))
    rows = []
    for i in range(count):
        text = texts[i % len(texts)]
        start = (i // len(texts)) * max(1, (len(text.content) - width) // per_text)
        ids = tokenizer(text.content[start:start + width], add_special_tokens=False)["input_ids"]
        if len(ids) < options.seq_len:
            raise EdgepruneError(f"recovery text {text.name} is too short for {per_text} windows of {options.seq_len} "
                                 "tokens: give a longer text or fewer distillation steps")
        rows.append(ids[:options.seq_len])
    batch = torch.tensor(rows, dtype=torch.long)
    if bos_id is not None:
        batch[:, 0] = bos_id
    held = torch.zeros(count, dtype=torch.bool)
    held[np.linspace(0, count - 1, options.held_out).round().astype(int)] = True
    return batch[~held], batch[held]


@dataclass(frozen=True)
class RecoveryEstimate:
    """What recovery will take on this machine, timed on the unpruned model before any of it: its training steps
    are an upper bound on the pruned student's (training cost grows with the parameters)."""

    teacher_seconds: float  # the teacher's pass over every window
    seconds_per_step: float  # a training step, with its share of the held-out measurements
    steps: int  # in all, over the pruning steps

    @property
    def minutes(self) -> float:
        return (self.teacher_seconds + self.steps * self.seconds_per_step) / 60

    def check(self, budget_minutes: float) -> None:
        """Refuse a recovery that cannot fit its budget, before it starts."""
        if self.minutes > budget_minutes:
            raise EdgepruneError(
                f"recovery by distillation would take about {self.minutes:.1f} min on this machine (the teacher's "
                f"pass {self.teacher_seconds:.0f} s, then {self.steps} steps of {self.seconds_per_step:.2f} s), over "
                f"its budget of {budget_minutes:g} min: raise recovery_minutes (--recovery-minutes), give fewer "
                "--distill-steps, or more --threads")


def estimate(teacher: torch.nn.Module, options: DistillOptions, rounds: int = 1) -> RecoveryEstimate:
    """Time one teacher batch and one training step (forward, backward) of `teacher`, leaving its weights as they
    are, for `rounds` pruning steps each trained `options.steps`; before any window is cut, however many. One timing
    at a time: a build's targets share one model (`--jobs 2`), whose trainable flags a timing sets and restores."""
    with _TIMING:
        return _timed(teacher, options, rounds)


_TIMING = threading.Lock()


def _timed(teacher: torch.nn.Module, options: DistillOptions, rounds: int) -> RecoveryEstimate:
    device = next(teacher.parameters()).device
    tokens = torch.randint(0, teacher.config.vocab_size, (options.batch_size, options.seq_len), device=device)
    start = time.perf_counter()
    with torch.inference_mode():
        teacher(tokens, use_cache=False).logits.float().log_softmax(-1).topk(options.top_k, dim=-1)
    forward = time.perf_counter() - start
    adapters = _adapted(teacher, options.lora_rank, options.seed) if options.lora_rank else []
    trained = {name for name, _ in _trainable(teacher)}
    wanted = {name: p.requires_grad for name, p in teacher.named_parameters()}
    for name, parameter in teacher.named_parameters():
        parameter.requires_grad_(name in trained)
    start = time.perf_counter()
    try:
        torch.log_softmax(teacher(tokens, use_cache=False).logits.float(), -1).mean().backward()
    finally:
        for name, parameter in teacher.named_parameters():
            parameter.grad = None
            parameter.requires_grad_(wanted.get(name, False))
        _remove(adapters, merge=False)
    step = time.perf_counter() - start
    evaluations = -(-options.held_out // options.batch_size) * (options.steps // options.eval_every + 1)
    batches = -(-(options.steps * options.batch_size + options.held_out) // options.batch_size)
    return RecoveryEstimate(batches * forward, step + evaluations * forward / options.steps, options.steps * rounds)


class TeacherCache:
    """The training and held-out windows, and the teacher's top-k log-probs, their token ids and the log of the
    remaining mass at every position of them, in .npy files read through memory maps."""

    def __init__(self, directory: Path):
        self.directory = directory
        arrays = {name: {part: np.load(directory / f"{part}-{name}.npy", mmap_mode="r") for part in ("train", "held")}
                  for name in ("tokens", "logp", "ids", "tail")}
        self.tokens, self.logp, self.ids, self.tail = (arrays[n] for n in ("tokens", "logp", "ids", "tail"))

    @classmethod
    def build(cls, teacher: torch.nn.Module, train: torch.Tensor, held: torch.Tensor, top_k: int, directory: Path,
              progress: Progress | None = None, batch_size: int = 4) -> TeacherCache:
        """Run the teacher over the windows once, `batch_size` at a time, writing each part's arrays as it goes.
        A directory whose stamp matches (the same teacher weights, windows and top-k) is reused."""
        digest = hashlib.sha256(train.numpy().tobytes() + held.numpy().tobytes() + str(top_k).encode())
        _hash_parameters(digest, teacher.named_parameters())
        stamp = digest.hexdigest()
        if (directory / "stamp").is_file() and (directory / "stamp").read_text() == stamp:
            return cls(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "stamp").unlink(missing_ok=True)
        device = next(teacher.parameters()).device
        for part, tokens in (("train", train), ("held", held)):
            n, length = tokens.shape
            np.save(directory / f"{part}-tokens.npy", tokens.numpy())
            arrays = {name: np.lib.format.open_memmap(directory / f"{part}-{name}.npy", mode="w+", dtype=dtype,
                                                      shape=shape)
                      for name, dtype, shape in (("logp", np.float32, (n, length, top_k)),
                                                 ("ids", np.int32, (n, length, top_k)),
                                                 ("tail", np.float32, (n, length)))}
            with torch.inference_mode():
                for start in range(0, n, batch_size):
                    logp = torch.log_softmax(teacher(tokens[start:start + batch_size].to(device), use_cache=False).logits.float(), -1)
                    top = logp.topk(top_k, dim=-1)
                    stop = start + len(top.values)
                    arrays["logp"][start:stop] = top.values.cpu().numpy()
                    arrays["ids"][start:stop] = top.indices.cpu().numpy()
                    arrays["tail"][start:stop] = _log1mexp(torch.logsumexp(top.values, -1)).cpu().numpy()
                    if progress:
                        progress(f"distillation: teacher top-{top_k}, {part} windows {stop}/{n}")
            for array in arrays.values():
                array.flush()
        (directory / "stamp").write_text(stamp)
        return cls(directory)

    def batch(self, part: str, rows: slice, device: torch.device) -> tuple[torch.Tensor, ...]:
        """Tokens, teacher log-probs, their ids and tail of some windows of `part`."""
        return tuple(torch.from_numpy(np.array(a[part][rows])).to(device)
                     for a in (self.tokens, self.logp, self.ids, self.tail))


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x ≤ 0, kept finite where the top-k already hold all the mass."""
    return torch.log(torch.clamp(-torch.expm1(x), min=1e-12))


def topk_kl(student_logits: torch.Tensor, logp: torch.Tensor, ids: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
    """Mean KL(teacher ‖ student) per position, over the teacher's top-k tokens and the rest taken as one."""
    return _topk_kl(torch.log_softmax(student_logits.float(), -1), logp, ids, tail)


def _topk_kl(student: torch.Tensor, logp: torch.Tensor, ids: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
    mine = student.gather(-1, ids.long())
    my_tail = _log1mexp(torch.logsumexp(mine, -1))
    kl = (logp.exp() * (logp - mine)).sum(-1) + tail.exp() * (tail - my_tail)
    return kl.mean()


def recovery_loss(student_logits: torch.Tensor, tokens: torch.Tensor, logp: torch.Tensor, ids: torch.Tensor,
                  tail: torch.Tensor, label_weight: float) -> torch.Tensor:
    """The training loss: the teacher's top-k KL, and with `label_weight` of the whole the cross-entropy of the
    window's own next tokens, which the teacher's logits only approximate (DistillOptions says what it won). The
    student's log-probs are taken once for both: on Gemma's 262k-token vocabulary a copy is 1 GB a step."""
    student = torch.log_softmax(student_logits.float(), -1)
    kl = _topk_kl(student, logp, ids, tail)
    if not label_weight:
        return kl
    nll = torch.nn.functional.nll_loss(student[:, :-1].reshape(-1, student.shape[-1]), tokens[:, 1:].reshape(-1))
    return (1 - label_weight) * kl + label_weight * nll


def _trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """What distillation changes: the decoder layers' weights and the final norm, or, while low-rank adapters are
    in place, the adapters and the norms; embeddings and head stay."""
    if any(isinstance(m, LowRankAdapter) for m in model.modules()):
        return [(n, p) for n, p in model.named_parameters()
                if n.endswith((".lora_a", ".lora_b")) or n.endswith("norm.weight")]
    return [(n, p) for n, p in model.named_parameters() if n.startswith("model.layers.") or n == "model.norm.weight"]


class LowRankAdapter(torch.nn.Module):
    """A frozen projection plus a trained rank-r update B·A (LoRA), which `merge` folds back into the projection's
    weight: the exported model keeps its shape and its cost, no adapter is shipped."""

    def __init__(self, base: torch.nn.Linear, rank: int, generator: torch.Generator):
        super().__init__()
        self.base = base
        bound = 1 / math.sqrt(base.in_features)
        self.lora_a = torch.nn.Parameter(
            (torch.rand(rank, base.in_features, generator=generator) * 2 - 1).mul_(bound).to(base.weight))
        self.lora_b = torch.nn.Parameter(torch.zeros(base.out_features, rank).to(base.weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.t()) @ self.lora_b.t()

    def merge(self) -> torch.nn.Linear:
        with torch.no_grad():
            self.base.weight += self.lora_b @ self.lora_a
        return self.base


def _adapted(model: torch.nn.Module, rank: int, seed: int) -> list[tuple[torch.nn.Module, str, LowRankAdapter]]:
    """Put an adapter on every linear projection of the decoder layers; returns where each went."""
    generator = torch.Generator().manual_seed(seed)
    placed = []
    for layer in model.model.layers:
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    adapter = LowRankAdapter(child, rank, generator)
                    setattr(parent, name, adapter)
                    placed.append((parent, name, adapter))
    return placed


def _remove(placed: list[tuple[torch.nn.Module, str, LowRankAdapter]], merge: bool) -> None:
    for parent, name, adapter in placed:
        setattr(parent, name, adapter.merge() if merge else adapter.base)


def _digest(named: list[tuple[str, torch.nn.Parameter]], options: DistillOptions, cache: TeacherCache) -> str:
    digest = hashlib.sha256(json.dumps(asdict(options), sort_keys=True).encode())
    digest.update((cache.directory / "stamp").read_bytes())
    _hash_parameters(digest, named)
    return digest.hexdigest()


def _hash_parameters(digest, named) -> None:
    for name, parameter in named:
        digest.update(name.encode())
        digest.update(parameter.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())


class _DeferredInterrupt:
    """While active, SIGINT and SIGTERM only record themselves, so a training step is never cut in half; the loop
    checks `received` between steps, writes its checkpoint and then raises as the signal would have. Only the main
    thread can hold signals (`edgeprune build --jobs 2` trains in worker threads): elsewhere it defers nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self):
        self.received = None
        in_main = threading.current_thread() is threading.main_thread()
        self.previous = {s: signal.getsignal(s) for s in self.SIGNALS} if in_main else {}
        for s in self.previous:
            signal.signal(s, self._record)
        return self

    def _record(self, signum, frame):  # noqa: ARG002 - signal handler signature
        self.received = signum

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        return False

    def raise_now(self):
        from edgeprune.core.atomic import interruption

        raise interruption(self.received)


def distill(student: torch.nn.Module, cache: TeacherCache, options: DistillOptions, checkpoint: Path,
            progress: Progress | None = None) -> DistillResult:
    """Train `student` (in place) towards the cached teacher. `checkpoint` is written on Ctrl-C/SIGTERM, and when
    training ends (weights only), and read back by the next call with the same student, teacher cache and options:
    an interrupted run resumes, a finished one returns at once (an iterative run resumed in a later step skips the
    recoveries it finished). The caller removes it when the export is done."""
    options.validate()
    start = time.perf_counter()
    device = next(student.parameters()).device
    # the student's starting decoder weights, whatever trains them: adapters start from the seed, but a checkpoint of
    # adapters fits only the weights they were trained on
    key = _digest(_trainable(student), options, cache)
    adapters = _adapted(student, options.lora_rank, options.seed) if options.lora_rank else []
    named = _trainable(student)
    for parameter in student.parameters():
        parameter.requires_grad_(False)
    for _, parameter in named:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW([p for _, p in named], lr=options.learning_rate, weight_decay=0.0)
    state = {"step": 0, "best": math.inf, "best_step": 0, "since_best": 0, "held_out_loss": [], "train_loss": [],
             "stopped": False}
    best = checkpoint.with_name(checkpoint.stem + "-best.pt")  # the weights at the best held-out loss so far
    resumed_from = 0
    if checkpoint.is_file():
        saved = torch.load(checkpoint, map_location=device, weights_only=False)
        if saved.get("key") == key:
            _copy_into(named, saved["weights"])
            if saved["optimizer"] is not None:
                optimizer.load_state_dict(saved["optimizer"])
            state = saved["state"]
            resumed_from = state["step"]
            if progress:
                progress(f"distillation: resuming at step {resumed_from} from {checkpoint}")
    n_train = len(cache.logp["train"])
    finished = state["stopped"] or state["step"] >= options.steps
    student.train()
    try:
        with _DeferredInterrupt() as interrupt:
            while state["step"] < options.steps and not state["stopped"]:
                step = state["step"]
                if step % options.eval_every == 0 and len(state["held_out_loss"]) <= step // options.eval_every:
                    _held_out_check(student, cache, options, state, named, best, progress)
                    if state["stopped"]:
                        break
                first = step * options.batch_size % n_train
                rows = slice(first, first + options.batch_size)
                tokens, logp, ids, tail = cache.batch("train", rows, device)
                loss = recovery_loss(student(tokens, use_cache=False).logits, tokens, logp, ids, tail,
                                     options.label_weight)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                state["train_loss"].append(float(loss.detach()))
                state["step"] = step + 1
                if progress:
                    progress(f"distillation: step {step + 1}/{options.steps}, loss {state['train_loss'][-1]:.4f}")
                if interrupt.received is not None:
                    _save(checkpoint, key, named, optimizer, state)
                    interrupt.raise_now()
            if not finished and not state["stopped"]:
                _held_out_check(student, cache, options, state, named, best, progress)
            if not finished and state["best_step"] != state["step"]:
                _copy_into(named, torch.load(best, map_location=device, weights_only=True))
                if progress:
                    progress(f"distillation: keeping the weights of step {state['best_step']}, the best held-out loss "
                             f"({state['best']:.4f})")
    finally:
        student.eval()
        for parameter in student.parameters():
            parameter.requires_grad_(False)
        _remove(adapters, merge=True)  # an interrupted run is resumed from its checkpoint, merged or not
    if not finished:
        _save(checkpoint, key, named, None, state)
        best.unlink(missing_ok=True)
    return DistillResult(state["step"], state["stopped"], resumed_from, time.perf_counter() - start,
                         state["held_out_loss"], state["train_loss"], state["best_step"])


def _held_out_check(student, cache: TeacherCache, options: DistillOptions, state: dict, named, best: Path,
                    progress) -> None:
    """The stop rule: the training loss on held-out windows; `patience` measurements without a new best end training.
    A new best's weights are saved to `best`, which training ends with (a later step can only be worse there)."""
    device = next(student.parameters()).device
    with torch.no_grad():
        total = 0.0
        n = len(cache.logp["held"])
        for start in range(0, n, options.batch_size):
            rows = slice(start, start + options.batch_size)
            tokens, logp, ids, tail = cache.batch("held", rows, device)
            part = recovery_loss(student(tokens, use_cache=False).logits, tokens, logp, ids, tail,
                                 options.label_weight)
            total += float(part) * len(logp)
    loss = total / n
    state["held_out_loss"].append(loss)
    if loss < state["best"]:
        state["best"], state["best_step"], state["since_best"] = loss, state["step"], 0
        with atomic_output(best) as tmp:
            torch.save([p.detach() for _, p in named], tmp)
    else:
        state["since_best"] += 1
        state["stopped"] = state["since_best"] >= options.patience
    if progress:
        progress(f"distillation: held-out loss {loss:.4f} at step {state['step']}"
                 + (" (no better for the last measurements: stopping)" if state["stopped"] else ""))


def _copy_into(named, values) -> None:
    with torch.no_grad():
        for (_, parameter), value in zip(named, values):
            parameter.copy_(value)


def _save(path: Path, key: str, named, optimizer, state: dict) -> None:
    with atomic_output(path) as tmp:
        torch.save({"key": key, "weights": [p.detach() for _, p in named],
                    "optimizer": optimizer.state_dict() if optimizer is not None else None, "state": state}, tmp)
