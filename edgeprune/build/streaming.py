"""The layer-streamed pipeline: models of 1B–8B through a machine that cannot hold them in float32.

Weights are read one decoder layer at a time (`edgeprune.build.weights`), converted to float32 only while that layer
is worked on, and written to the GGUF before the next one is read. Calibration runs layer-major: the hidden
states of the calibration sequences between two layers are all that is kept (in files when they are large).

Pruning takes two passes. The first scores every layer (and, for --layers, measures block influence first);
the plan then fixes every layer's width, so the GGUF header can be written; the second cuts and recovers each
layer, collects the pruned model's importance matrix, and writes its tensors. A uniform cut recovered by
reconstruction needs no first pass: its widths follow from the shapes alone, and each layer is scored in the
second pass from the original stream the refit runs anyway (_OnePassScorer). The numbers are those of the
in-memory path (the same functions run on the same chunks), so both paths write identical GGUFs.

Streamable: criteria edgeprune/flap, wanda-sp, magnitude and random; allocations uniform and adaptive;
recoveries reconstruct, bias and none; whole-layer removal. Not streamable: the taylor criterion (it needs
gradients through the whole model at once), several iterative steps, and head_mode "auto" (it compares two
whole-model trial prunings), which streams as "per-group"; the in-memory path (--streaming off) has them.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from converters import ConversionInput, writer_class

from edgeprune.build.calibration import (
    CalibrationStats, LayerContext, _Accumulator, calibration_batches, chunk_sizes, collect_calibration, embed_chunks,
    observe_layer, observe_output,
)
from edgeprune.core.errors import EdgepruneError
from edgeprune.core.families import family_of
from edgeprune.build.loading import LazyModel
from edgeprune.build.pruning.allocation import LayerPlan
from edgeprune.core.shapes import LayerShape, ModelShape, sliding_layers
from edgeprune.build.weights import EMBEDDING

Progress = Callable[[str], None]
SPILL_BYTES = 1 << 30  # a stream of hidden states larger than this goes to files next to the output
BATCH = 8  # calibration sequences per forward chunk, as in the in-memory path


def compute_device(requested: str | None = None) -> torch.device:
    """A CUDA GPU when torch sees one (or when asked), else the CPU; results agree to float tolerance."""
    if requested:
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise EdgepruneError(f"--device {requested}: torch sees no CUDA GPU here; use --device cpu")
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class LazyLayers:
    """The layer-by-layer view of a LazyModel: each call to `layer` reads and builds one decoder layer."""

    def __init__(self, lazy: LazyModel, device: torch.device, keep: list[int] | None = None):
        self.lazy, self.config, self.device = lazy, lazy.config, device
        self.family = family_of(lazy.config)
        self.keep = list(range(lazy.config.num_hidden_layers)) if keep is None else list(keep)
        self.n_layers = len(self.keep)
        if self.n_layers != lazy.config.num_hidden_layers:  # the kept layers' config: their types, renumbered
            self.config = copy.deepcopy(lazy.config)
            self.config.num_hidden_layers = self.n_layers
            if getattr(self.config, "layer_types", None) is not None:
                self.config.layer_types = [lazy.config.layer_types[i] for i in self.keep]
        self.rotary_emb = self.family.transformers_class("RotaryEmbedding")(config=lazy.config).to(device)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Embedding lookup from the memory-mapped matrix: only the rows used are converted."""
        unique, inverse = np.unique(ids.cpu().numpy(), return_inverse=True)
        rows = self.lazy.weights.rows(EMBEDDING, unique)
        if self.family.scaled_embedding:  # as Gemma3TextScaledWordEmbedding computes it, in float32
            rows = rows * torch.tensor(self.config.hidden_size ** 0.5).to(rows.dtype)
        return rows[torch.as_tensor(inverse.reshape(ids.shape))].to(self.device)

    def layer(self, index: int) -> torch.nn.Module:
        prefix = f"model.layers.{self.keep[index]}."
        with torch.device("meta"):
            layer = self.family.transformers_class("DecoderLayer")(self.config, layer_idx=index)
        state = {name: self.lazy.weights.load(prefix + name).to(self.device) for name in layer.state_dict()}
        layer.load_state_dict(state, assign=True)
        return layer.eval()

    def norm(self) -> torch.nn.Module:
        norm = self.family.transformers_class("RMSNorm")(self.config.hidden_size, eps=self.config.rms_norm_eps)
        norm.weight.data = self.lazy.weights.load("model.norm.weight").to(self.device)
        return norm.to(self.device)


def lazy_shape(lazy: LazyModel) -> ModelShape:
    """The unpruned model's shape from its config and tensor shapes, without reading any weights."""
    c, w = lazy.config, lazy.weights
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    names = w.names()

    def layer(i: int) -> LayerShape:
        prefix = f"model.layers.{i}."
        biased = {module: f"{prefix}{module}.bias" in names for module in ("self_attn.q_proj", "self_attn.o_proj",
                                                                            "mlp.gate_proj", "mlp.down_proj")}
        return LayerShape(w.shape(f"{prefix}self_attn.q_proj.weight")[0] // head_dim,
                          w.shape(f"{prefix}self_attn.k_proj.weight")[0] // head_dim,
                          w.shape(f"{prefix}mlp.gate_proj.weight")[0], biased["self_attn.o_proj"],
                          biased["mlp.down_proj"], biased["self_attn.q_proj"], biased["mlp.gate_proj"])

    window, sliding = sliding_layers(c)
    layers = tuple(dataclasses.replace(layer(i), sliding=sliding[i]) for i in range(c.num_hidden_layers))
    vocab, hidden = w.shape(EMBEDDING)
    return ModelShape(vocab, hidden, head_dim, layers, bool(c.tie_word_embeddings), sliding_window=window)


def conversion_input(lazy: LazyModel, metadata: dict[str, str], config=None) -> ConversionInput:
    """What the writer needs of a lazy model; `config` is the kept layers' when layers were removed."""
    return ConversionInput(None, lazy.vocab, lazy.name, lazy.context_length, metadata, config=config or lazy.config)


@dataclass
class StreamedBuild:
    """What a streamed pass wrote: the GGUF, the pruning summary (None without pruning), and the pruned
    model's calibration statistics for the importance matrix (None when not asked for)."""

    gguf: Path
    shape: ModelShape
    pruning: dict | None = None
    stats: CalibrationStats | None = None
    seconds: dict[str, float] = field(default_factory=dict)


def check_streamable(options) -> None:
    """Refuse, before any work, the pruning options that need the whole model at once."""
    if options.criterion == "taylor":
        raise EdgepruneError("--method taylor needs gradients through the whole model, which the layer-streamed "
                             "path never holds: choose another method, or --streaming off if the model fits in RAM")
    if options.steps != 1:
        raise EdgepruneError(f"{options.steps} pruning steps re-score the whole model between steps, which the "
                             "layer-streamed path does not do: use one step, or --streaming off")


def stream_write(lazy: LazyModel, path: Path, metadata: dict[str, str], *, token_ids: list[int] | None = None,
                 options=None, imatrix: tuple[int, int, str] | None = None, device: torch.device | None = None,
                 progress: Progress | None = None) -> StreamedBuild:
    """Write `lazy` as an F16 GGUF layer by layer, pruned by `options` (a PruneOptions) when given, calibrated
    on `token_ids`. `imatrix` = (n_sequences, seq_len, text_name) asks for the written model's statistics (the
    importance matrix), collected from each layer as it is written."""
    say = progress or (lambda _msg: None)
    device = device or compute_device()
    seconds: dict[str, float] = {}
    path.parent.mkdir(parents=True, exist_ok=True)
    spill = Path(tempfile.mkdtemp(prefix=".edgeprune-hidden-", dir=path.parent))
    try:
        source = LazyLayers(lazy, device)
        cut, pruning = None, None
        if options is not None:
            start = time.perf_counter()
            source, cut, pruning = _score_and_plan(lazy, source, token_ids, options, device, spill, say)
            seconds["score"] = round(time.perf_counter() - start, 2)
        shape = _written_shape(lazy_shape(lazy), source.keep, cut and cut.plans, options,
                               source.family.output_biases) if options else lazy_shape(lazy)
        writer = writer_class(source.config, shape)(conversion_input(lazy, metadata, source.config), shape)
        acc = None
        if imatrix is not None:
            n_seq, seq_len, text_name = imatrix
            batches = calibration_batches(token_ids, n_seq, seq_len, lazy.config.bos_token_id)
            acc = _Accumulator(CalibrationStats(text_name=text_name, n_tokens=batches.numel()), source.n_layers)
        start = time.perf_counter()
        tensors = _written_tensors(writer, source, cut, acc and batches, acc, device, spill, say)
        writer.write(path, "F16", say, tensors)
        seconds["prune_and_write" if options is not None else "write"] = round(time.perf_counter() - start, 2)
        if pruning is not None:
            before = lazy_shape(lazy).decoder_params()
            pruning = {"architecture": writer.arch_name, "removed_params": before - shape.decoder_params(),
                       "decoder_params_before": before, "layers": [asdict(layer) for layer in shape.layers],
                       "details": pruning}
            pruning["details"]["widths"] = [(s.n_head, s.n_head_kv, s.n_ff) for s in shape.layers]
        written_stats = acc.stats if acc is not None else None
        if written_stats is not None:
            written_stats.layer_cosines = acc.cos_sum / np.maximum(acc.cos_count, 1)
        return StreamedBuild(path, shape, pruning, written_stats, seconds)
    finally:
        shutil.rmtree(spill, ignore_errors=True)


def _spill_dir(spill: Path, n_seq: int, seq_len: int, hidden: int) -> Path | None:
    return spill if n_seq * seq_len * hidden * 4 > SPILL_BYTES else None


@dataclass
class _Cut:
    """Pass two's instructions: the plan per kept layer, and what recovery needs. With a `scorer`, the plans
    only fix the widths, and each layer is scored and planned in pass two (_OnePassScorer)."""

    plans: list
    options: object  # PruneOptions
    stats: CalibrationStats | None  # the unpruned model's, for bias compensation
    token_ids: list[int]
    scorer: _OnePassScorer | None = None


class _OnePassScorer:
    """Score and plan each layer in pass two, from the original stream the refit runs anyway, instead of a
    scoring pass over the whole model first. Possible for a uniform cut recovered by reconstruction without
    layer removal: select_uniform counts parameters, never scores, so every layer's widths are known before
    any layer is scored, and a layer's plan depends on its own scores only. The statistics are those the
    scoring pass would collect, from the same chunks, so the file is the same byte for byte. On the 8B shape
    (8×256 tokens) that pass was 15 s of each layer's 78."""

    def __init__(self, kept: ModelShape, options, head_mode: str, targets: tuple[float, float]):
        from edgeprune.build.pruning.criteria import LayerScores
        from edgeprune.build.pruning.prune import plan_removals

        self.kept, self.options, self.head_mode, self.targets = kept, options, head_mode, targets
        self.rng = np.random.default_rng(options.seed)
        self.placeholders = [LayerScores(np.zeros(s.n_head), np.zeros(s.n_ff)) for s in kept.layers]
        self.plans = plan_removals(kept, self.placeholders, options, head_mode, *targets)  # the widths only
        self.stats = CalibrationStats(text_name="", n_tokens=0)
        self.acc = _Accumulator(self.stats, len(kept.layers))

    def planner(self, index: int, layer: torch.nn.Module, head_dim: int, say: Progress) -> Callable[[], LayerPlan]:
        """Hook the inputs the criteria read (o_proj's and down_proj's); the function returned unhooks, scores
        and plans the layer, once the original stream has been through it."""
        from edgeprune.build.pruning.criteria import score_layer
        from edgeprune.build.pruning.prune import plan_removals

        prefix = f"model.layers.{index}"
        watched = [(layer.mlp.down_proj, f"{prefix}.mlp.down_proj")]
        if getattr(layer.self_attn, "q_proj", None) is not None:
            watched.append((layer.self_attn.o_proj, f"{prefix}.self_attn.o_proj"))
        handles = [module.register_forward_pre_hook(self.acc.linear_hook(name)) for module, name in watched]

        def plan() -> LayerPlan:
            for handle in handles:
                handle.remove()
            self.acc._last = None
            scores = list(self.placeholders)
            scores[index] = score_layer(index, layer, self.options.criterion, self.stats, head_dim, self.rng)
            say(f"scoring: layer {index + 1}/{len(self.kept.layers)}")
            return plan_removals(self.kept, scores, self.options, self.head_mode, *self.targets)[index]

        return plan


def _score_and_plan(lazy: LazyModel, source: LazyLayers, ids: list[int], options, device, spill: Path,
                    say: Progress):
    """Pass one: layer removal by block influence, then every kept layer's scores, then the plan. A uniform cut
    recovered by reconstruction skips the scoring: its cut carries an _OnePassScorer instead. None: layers only."""
    from edgeprune.build.pruning.criteria import NEEDS_STATISTICS, score_layer
    from edgeprune.build.pruning.prune import check_family, plan_removals, prune_targets

    base = lazy_shape(lazy)
    options.validate(base.n_layers)
    check_family(options, lazy.config)
    check_streamable(options)
    spill_dir = _spill_dir(spill, options.calib_sequences, options.calib_seq_len, base.hidden_size)
    details: dict = {"method": options.method, "criterion": options.criterion, "allocation": options.allocation,
                     "recovery": options.recovery, "streamed": True,
                     "steps": [{}] if options.heads or options.ffn else []}
    if options.layers:
        influence = collect_calibration(source, ids, n_seq=options.calib_sequences, seq_len=options.calib_seq_len,
                                        include_lm_head=False, progress=say, spill_dir=spill_dir).block_influence()
        influence[0] = np.inf
        drop = sorted(int(i) for i in np.argsort(influence, kind="stable")[: options.layers])
        details["dropped_layers"] = drop
        source = LazyLayers(lazy, device, [i for i in range(base.n_layers) if i not in drop])
    kept = dataclasses.replace(base, layers=tuple(base.layers[i] for i in source.keep))
    head_mode = "per-group" if options.head_mode == "auto" else options.head_mode
    n_tokens = calibration_batches(ids, options.calib_sequences, options.calib_seq_len, None).numel()
    details.update(head_mode=head_mode, calibration_tokens=n_tokens)
    if not (options.heads or options.ffn):
        return source, None, details
    targets = prune_targets(kept, kept, options, 1.0)
    if options.allocation == "uniform" and options.recovery == "reconstruct" and not options.layers:
        scorer = _OnePassScorer(kept, options, head_mode, targets)
        return source, _Cut(scorer.plans, options, None, ids, scorer), details
    stats = None
    if options.criterion in NEEDS_STATISTICS or options.recovery == "bias":
        stats = collect_calibration(source, ids, n_seq=options.calib_sequences, seq_len=options.calib_seq_len,
                                    include_lm_head=False, progress=say, spill_dir=spill_dir)
    rng, scores = np.random.default_rng(options.seed), []
    with torch.no_grad():
        for i in range(source.n_layers):
            scores.append(score_layer(i, source.layer(i), options.criterion, stats, base.head_dim, rng))
            say(f"scoring: layer {i + 1}/{source.n_layers}")
    plans = plan_removals(kept, scores, options, head_mode, *targets)
    return source, _Cut(plans, options, stats, ids), details


def _written_shape(base: ModelShape, keep: list[int], plans, options, output_biases: bool) -> ModelShape:
    """The shape the header declares: known before any layer is cut, because the plan fixes every width."""
    layers = tuple(base.layers[i] for i in keep)
    if plans is not None:
        # bias compensation and the refit give o_proj and down_proj a bias, where the family's graph has one
        bias = options.recovery != "none" and output_biases
        layers = tuple(
            dataclasses.replace(old, n_head=len(p.keep_heads), n_head_kv=len(p.keep_kv), n_ff=len(p.keep_channels),
                                attn_output_bias=(bias or old.attn_output_bias) and len(p.keep_heads) > 0,
                                ffn_down_bias=bias or old.ffn_down_bias,
                                attn_qkv_bias=old.attn_qkv_bias and len(p.keep_heads) > 0)
            for p, old in zip(plans, layers)
        )
    shape = dataclasses.replace(base, layers=layers)
    if shape.decoder_params() == base.decoder_params():
        raise EdgepruneError(f"the pruning ratios remove nothing from this model (heads {options.heads:g}, ffn "
                             f"{options.ffn:g}): each layer keeps whole heads and FFN widths on multiples of "
                             f"{options.align}; give larger ratios")
    return shape


def _written_tensors(writer, source: LazyLayers, cut: _Cut | None, batches, acc, device, spill: Path,
                     say: Progress) -> Iterator[tuple[str, torch.Tensor]]:
    """Pass two, as a stream of GGUF tensors: cut and recover each layer, observe it for the importance matrix,
    and hand its tensors to the writer. A layer is held back until the next one is cut, because losing all
    its heads moves the next layer's attention bias into this layer's down_proj."""
    from edgeprune.build.pruning.prune import cut_layer
    from edgeprune.build.pruning.recovery import reconstruct_layer
    from edgeprune.build.pruning.surgery import add_output_bias

    config, hidden, head_dim = source.config, writer.shape.hidden_size, writer.shape.head_dim
    yield from writer.head_tensors(source.lazy.weights.load(EMBEDDING))
    with torch.no_grad():
        observe = streams = None
        if acc is not None:
            observe_ctx = LayerContext(config, source.rotary_emb, chunk_sizes(len(batches), BATCH), batches.shape[1],
                                       device, _spill_dir(spill, len(batches), batches.shape[1], hidden))
            observe = embed_chunks(source, batches, observe_ctx, BATCH)
        if cut is not None and cut.options.recovery == "reconstruct":
            prune_batches = calibration_batches(cut.token_ids, cut.options.calib_sequences,
                                                cut.options.calib_seq_len, config.bos_token_id)
            ctx = LayerContext(config, source.rotary_emb, chunk_sizes(len(prune_batches), BATCH),
                               prune_batches.shape[1], device,
                               _spill_dir(spill, len(prune_batches), prune_batches.shape[1], hidden))
            streams = embed_chunks(source, prune_batches, ctx, BATCH)
            streams = (streams, streams)
        previous = None
        for i in range(source.n_layers):
            layer = source.layer(i)
            moved = None
            if streams is not None:
                plan = cut.scorer.planner(i, layer, head_dim, say) if cut.scorer else cut.plans[i]
                original, pruned, moved = reconstruct_layer(ctx, layer, plan, *streams, head_dim,
                                                            cut.options.ridge, source.family.output_biases)
                streams = (original, pruned)
            elif cut is not None:
                moved = cut_layer(i, layer, cut.plans[i], cut.stats, cut.options.recovery, head_dim)
            if moved is not None:
                previous[1].mlp.down_proj = add_output_bias(previous[1].mlp.down_proj, moved)
            if previous is not None:
                observe = yield from _finish_layer(writer, *previous, acc, observe_ctx if acc else None, observe)
            previous = (i, layer)
            say(f"{'pruning and writing' if cut is not None else 'writing'}: layer {i + 1}/{source.n_layers}")
        observe = yield from _finish_layer(writer, *previous, acc, observe_ctx if acc else None, observe)
        if acc is not None:
            observe_output(acc, source.norm(), observe)
    weights = source.lazy.weights
    yield from writer.tail_tensors(weights.load("model.norm.weight"),
                                   None if writer.shape.tied_embeddings else weights.load("lm_head.weight"))


def _finish_layer(writer, index: int, layer, acc, ctx, observe):
    """Observe a finished layer on the importance-matrix stream, then yield its tensors to the writer."""
    if acc is not None:
        observe = observe_layer(acc, index, layer, ctx, observe)
    yield from writer.layer_tensors(index, layer)
    return observe
