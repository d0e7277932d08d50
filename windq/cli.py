"""The `windq` command line. Library code raises WindqError; this layer turns it into one line on
stderr and exit code 2, and owns progress bars and output formats."""

from __future__ import annotations

import contextlib
import faulthandler
import io
import json
import logging
import os
import signal
import sys
from pathlib import Path

import click

from windq.errors import WindqError
from windq.keys import CalibrationFiles
from windq.pipeline.planner import METHODS

EPILOG_MODEL = "MODEL is a GGUF file, `default` (SmolLM2-135M-Instruct, embedded), or a hub repo id when online."
TEXT_HELP = "`wiki` (embedded Wikipedia leads; the held-out split for eval), a UTF-8 text file, or hf:DATASET[:CONFIG] when online."
OBJECTIVES = ("kl", "kl-fit", "proxy")  # what the planner minimises (pipeline/planner.py PlanConfig.objective)
# and, judged by `windq fidelity` only: kl expanded around each budget's plan (pipeline/kl_local.py)
FIDELITY_OBJECTIVES = OBJECTIVES + ("kl-local",)


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except WindqError as e:
            click.echo(f"windq: error: {e}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Show llama.cpp's own log lines.")
@click.version_option(package_name="windq")
def main(verbose: bool) -> None:
    """windq: fit a language model into a fixed number of bits.

    \b
    Typical flow:
      windq calibrate default --out runs/stats          # imatrix + sensitivity inputs
      windq plan default --stats runs/stats --bpw 5.0 --out plan.json
      windq export default --plan plan.json --gguf out.gguf --imatrix runs/stats/imatrix.gguf
      windq eval out.gguf --ref default
    """
    exit_on_sigterm()
    release_freed_memory()
    # a crash inside llama.cpp (a signal, not an exception) still prints where Python was; only
    # possible when stderr is a real file (not under click's test runner)
    with contextlib.suppress(io.UnsupportedOperation, AttributeError, ValueError):
        faulthandler.enable()
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(message)s")
    logging.getLogger("windq.llama").setLevel(logging.DEBUG if verbose else logging.CRITICAL)
    # the hub client logs every retry (its level is read from this variable at import); an error
    # reaches the user as windq's one line instead
    os.environ.setdefault("HF_HUB_VERBOSITY", "debug" if verbose else "error")


MMAP_THRESHOLD = 1 << 20  # bytes; glibc's default starts at 128 KiB and rises


def release_freed_memory() -> None:
    """Have glibc serve every allocation of MMAP_THRESHOLD bytes or more by its own mmap, so that
    freeing it returns it to the system.

    glibc's default raises that threshold to the size of the largest block freed (up to 32 MB), so
    a streamed model's decoded weights, freed after each module, come from the heap instead, and
    the small allocations made between them keep the heap from shrinking: streamed calibration's
    peak grew by the freed weights it could not give back, layer after layer. Set here, at the
    start of the command: set later (when the stream starts) it measured no effect, the heap having
    grown by then. The price is a page fault per fresh mapping (calibrate about 12 % slower on a
    1,024-wide model). Process-wide, and a no-op off glibc."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(-3, MMAP_THRESHOLD)  # -3: M_MMAP_THRESHOLD (malloc.h); a set value also stops the raising


def exit_on_sigterm() -> None:
    """`kill` (SIGTERM) unwinds like Ctrl-C, so temporary outputs are removed and no partial file
    is left behind (Python's default SIGTERM ends the process without running `finally`)."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))


class AlignWidth(click.ParamType):
    """An alignment width: rows padded to a multiple of it (256 lets K and IQ blocks fit). With
    `choices`, those words are accepted too (`plan --align auto|none|256`)."""

    name = "width"

    def __init__(self, *choices: str):
        self.choices = choices

    def get_metavar(self, param, ctx=None) -> str:
        return "|".join([*self.choices, "WIDTH"])

    def convert(self, value, param, ctx):
        if isinstance(value, int) or value not in self.choices:
            try:
                width = int(value)
            except (TypeError, ValueError):
                self.fail(f"{value!r}: use {' or '.join(self.choices) + ' or ' if self.choices else ''}a width such as 256", param, ctx)
            if width < 32 or width % 32:
                self.fail(f"{width}: a width is a positive multiple of 32 (256 for K and IQ types)", param, ctx)
            return width
        return value


# "all cores" is 0 on every command; library calls take None for it
threads_option = click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True, help="CPU threads; 0 = all cores.")
stream_option = click.option(
    "--stream", is_flag=True,
    help="Run the model in torch one module at a time, its weights read from the GGUF as it runs: the same results in the memory of one layer, for a model whose float32 weights do not fit (dense models; MoE is refused).",
)  # fmt: skip
verify_tokens_option = click.option(
    "--verify-tokens", type=click.IntRange(min=1),
    help="Held-in judge tokens (sequences of 256) the verification measures on; default every one `windq calibrate` kept (--judge-chunks: 2,048 with its defaults); more is refused.",
)  # fmt: skip


def _progress(desc: str, unit: str = "chunk"):
    """A tqdm bar fed by the library's (done, total) callbacks."""
    from tqdm import tqdm

    bar = {"b": None}

    def update(done: int, total: int) -> None:
        if bar["b"] is None:
            bar["b"] = tqdm(total=total, desc=desc, unit=unit, leave=False, disable=None)
        bar["b"].n = done
        bar["b"].refresh()
        if done >= total:
            bar["b"].close()

    return update


def _model_path(spec: str) -> Path:
    from windq.models.sources import resolve_model

    return resolve_model(spec)


@main.command("calibrate", epilog=EPILOG_MODEL)
@click.argument("model")
@click.option("--text", default="wiki", show_default=True, help=TEXT_HELP.replace("for eval", "for eval, the calibration split here"))
@click.option("--tokens", default=16384, show_default=True, help="Calibration tokens (whole chunks of --ctx).")
@click.option("--ctx", default=512, show_default=True, help="Tokens per chunk, each run from an empty cache.")
@click.option("--fisher-chunks", default=2, show_default=True, help="Chunks (of the imatrix's) the Fisher information is estimated on, one backward pass each.")
@click.option("--judge-chunks", default=8, show_default=True, help="Chunks cut after the imatrix's and kept out of it, for measuring plans' real KL.")
@threads_option
@stream_option
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for imatrix.gguf, fisher.npz, activations.npz, tokens.npy, judge-tokens.npy, calibration.json.")
def calibrate_cmd(model: str, text: str, tokens: int, ctx: int, fisher_chunks: int, judge_chunks: int, threads: int, stream: bool, out: str) -> None:
    """Run MODEL on calibration text and collect its importance matrix and Fisher information.

    Writes OUT/imatrix.gguf in llama-imatrix's GGUF format (usable by `windq export --imatrix` and
    by stock `llama-quantize --imatrix`), the Fisher marginals the planner's predictor of real loss
    uses, the activation statistics, and the tokens: the imatrix's and the judge chunks after them.
    """
    from windq.models.gguf_model import GGUFModel
    from windq.models.sources import resolve_text
    from windq.pipeline.calibrate import CalibrationConfig, calibrate, save_calibration

    if tokens < 1 or ctx < 2 or fisher_chunks < 1 or judge_chunks < 1:
        raise click.BadParameter("--tokens, --ctx, --fisher-chunks and --judge-chunks must be positive")
    src = GGUFModel(_model_path(model))
    cfg = CalibrationConfig(
        tokens=tokens, ctx=ctx, fisher_chunks=fisher_chunks, judge_chunks=judge_chunks, threads=threads or os.cpu_count() or 1, stream=stream
    )
    cal = calibrate(src, resolve_text(text, "calibration"), cfg, progress=_progress("calibrate"))
    save_calibration(cal, out, src.architecture)
    click.echo(
        f"calibrated {src.path.name} on {cal.meta['tokens']} tokens of {cal.meta['text']} in {cal.meta['seconds']:.1f} s: "
        f"{len(cal.stats)} weights → {Path(out) / CalibrationFiles.IMATRIX}"
    )


@main.command("plan", epilog=EPILOG_MODEL)
@click.argument("model")
@click.option("--stats", required=True, type=click.Path(file_okay=False), help="Folder from `windq calibrate` (tables are cached there).")
@click.option("--bpw", required=True, type=float, help="Budget: bits per weight over the whole file (every tensor's bytes).")
@click.option("--method", type=click.Choice(list(METHODS)), default="knapsack", show_default=True,
              help="knapsack: optimum of the --objective; ppo: MaskablePPO warm-started from it; uniform/random: baselines.")
@click.option("--objective", type=click.Choice(OBJECTIVES), default="kl", show_default=True,
              help="kl: the Fisher-predicted KL increase; kl-fit: the same, scaled per tensor to the real KL it causes alone "
              "(one forward pass of 512 calibration tokens per tensor, cached; measured no better than kl, README); proxy: llama.cpp-style imatrix-weighted squared error "
              "(ranks plans worse: `windq fidelity`).")
@click.option("--exclude-source", is_flag=True, help="Never plan a tensor in its source type (llama.cpp copies those error-free: a gift a user quantising from F16 does not get).")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Measure the plan's real KL on held-in judge tokens against the best uniform plan and every llama.cpp mix that fits; keep the best.")
@click.option("--verify-mixes", help="Comma-separated llama.cpp mixes to verify against (default: all 24 that llama-quantize offers, IQ1_S to Q8_0).")
@verify_tokens_option
@click.option("--sample-rows", type=click.IntRange(min=1), help="Build the sensitivity tables from about N rows of every larger tensor (sorted by predicted error, the top ones whole): for big models; default every row.")
@click.option("--granularity", default="tensor", show_default=True, help="`tensor`, or `chunk:G` (G = 128, 256, 512 columns) projected to one type per tensor for export.")
@click.option("--types", help="Comma-separated ggml types to allow (default: every legal one).")
@click.option("--seed", default=0, show_default=True, help="Seed for ppo and random.")
@click.option("--episodes", default=20, show_default=True, help="PPO training episodes (the policy is updated after every 4, so N is rounded up to a multiple of 4).")
@click.option("--policy", type=click.Path(dir_okay=False), help="Apply a policy saved by --save-policy instead of training (zero-shot transfer). Read as data: an sb3 zip or any other file is refused.")
@click.option("--save-policy", type=click.Path(dir_okay=False), help="Where to save the PPO policy: safetensors tensors + a JSON header (POLICY.safetensors).")
@click.option("--real-loss-tokens", default=1024, show_default=True, help="Held-in judge tokens (sequences of 256) for PPO's episode-end KL (0: none).")
@click.option("--align", "align", type=AlignWidth("auto", "none"), default="auto", show_default=True,
              help="WIDTH (256): plan the model zero-padded to rows a multiple of WIDTH (`windq align`), so K and IQ types fit; none: as it is; "
              "auto: plan both and keep the one llama.cpp measures closer to the source on held-in calibration tokens.")
@threads_option
@stream_option
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="plan.json to write; the allocation map goes beside it as .png.")
def plan_cmd(model, stats, bpw, method, objective, exclude_source, verify, verify_mixes, verify_tokens, sample_rows, granularity, types, seed, episodes, policy, save_policy, real_loss_tokens, align, threads, stream, out) -> None:
    """Allocate a ggml type to every tensor of MODEL within a bits-per-weight budget.

    Needs `windq calibrate MODEL --out STATS` first. Types that cannot be written (row length,
    missing importance data) are never offered; the budget is never exceeded. Bits count real
    weights only, so an aligned plan pays for its padding. With --align auto or 256 the aligned
    twin and its zero-padded statistics are kept in STATS/aligned-256/; `windq export` re-aligns
    the original model when the plan asks for it.
    """
    from windq import registry
    from windq.models.gguf_model import GGUFModel
    from windq.pipeline.alignment import plan_model
    from windq.pipeline.planner import PlanConfig, check_calibration_folder
    from windq.plan import save_plan
    from windq.pipeline.report import allocation_map, candidates_table, summary

    allowed = tuple(registry.get(t.strip()).name for t in types.split(",")) if types else None
    cfg = PlanConfig(
        bpw=bpw, method=method, granularity=granularity, types=allowed, seed=seed, episodes=episodes,
        policy=policy, real_loss_tokens=real_loss_tokens, threads=threads or None, objective=objective,
        exclude_source=exclude_source, verify=verify, verify_tokens=verify_tokens, verify_mixes=_mixes(verify_mixes), sample_rows=sample_rows,
        stream=stream,
    )  # fmt: skip
    bars = {}

    def progress(stage, done, total):
        bars.setdefault(stage, _progress(stage, unit={"tables": "job", "ppo": "step"}.get(stage, "chunk")))(done, total)

    check_calibration_folder(stats)  # a wrong --stats fails at once, before the model is parsed
    planned = plan_model(GGUFModel(_model_path(model)), stats, cfg, align, progress)
    result = planned.result
    _echo_alignment(planned)
    save_plan(result.plan, out)
    png = allocation_map(result.plan, Path(out).with_suffix(".png"))
    if save_policy and result.policy is not None:
        from windq.pipeline.ppo import save_policy as write_policy

        write_policy(result.policy, save_policy)
    for line in summary(result.plan, result.proxy_error, result.chunk_proxy_error, result.ppo):
        click.echo(line)
    for line in candidates_table(result.plan):
        click.echo(line)
    click.echo(f"wrote {out} and {png}")


def _mixes(spec: str | None) -> tuple[str, ...] | None:
    """--verify-mixes: llama.cpp mix names, each one llama-quantize offers."""
    if not spec:
        return None
    from windq.errors import InputError
    from windq.pipeline.verify import STOCK_MIXES

    mixes = tuple(m.strip().upper() for m in spec.split(","))
    unknown = [m for m in mixes if m not in STOCK_MIXES]
    if unknown:
        raise InputError(f"--verify-mixes {unknown[0]}: not a mix windq verifies against (one of {', '.join(STOCK_MIXES)})")
    return mixes


def _echo_alignment(planned) -> None:
    """The two alignment candidates `--align auto` measured, and which was kept."""
    if not planned.alignment:
        return
    for c in planned.alignment:
        label = "aligned to 256" if c.align else "as it is"
        if c.unreachable:
            click.echo(f"{label}: {c.unreachable}")
        else:
            kld = "" if c.kld is None else f", held-in KLD {c.kld:.5f}"
            click.echo(f"{label}: {c.achieved_bpw:.3f} bits per real weight{kld}")
    click.echo(f"chosen: {'aligned to 256' if planned.result.plan.provenance.get('align') else 'as it is'}")


@main.command("fidelity", epilog=EPILOG_MODEL)
@click.argument("model")
@click.option("--stats", required=True, type=click.Path(file_okay=False), help="Folder from `windq calibrate` (its judge chunks are the held-in tokens measured on).")
@click.option("--bpw", "budgets", required=True, help="Comma-separated bits-per-weight budgets, e.g. 4.6,5.0,5.5.")
@click.option("--objective", "objectives", default="kl,proxy", show_default=True, help="Comma-separated objectives to judge (kl, kl-fit, proxy, kl-local: kl expanded around the budget's kl optimum with the real loss's gradient there, measured worse than kl, see the README).")
@click.option("--relinearize", default=0, show_default=True, help="kl-local: expand this many more times, each around the last expansion's optimum.")
@click.option("--rivals", default=10, show_default=True, help="Near-optimal rival plans per budget (the objective's optimum with each tensor's errors scaled by log-normal noise).")
@click.option("--tokens", default=2048, show_default=True, help="Held-in judge tokens (sequences of 256) each plan's real KL is measured on.")
@click.option("--exclude-source", is_flag=True, help="Plan without the source type, as for a model quantised from F16.")
@click.option("--align", "align", type=AlignWidth("none"), default="none", show_default=True, help="none, or WIDTH: judge the plans of the model aligned to WIDTH.")
@click.option("--seed", default=0, show_default=True, help="Seed of the rivals' noise.")
@threads_option
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def fidelity_cmd(model, stats, budgets, objectives, relinearize, rivals, tokens, exclude_source, align, seed, threads, as_json) -> None:
    """Does the planner's objective rank plans as the real loss does?

    At each budget, the objective's optimum and RIVALS near-optimal plans of the same size are
    measured by their real KL(reference ‖ plan) on held-in judge tokens. Prints the Spearman rank
    correlation between the objective and the real KL (1: the knapsack orders these plans as the
    model does), where the optimum ranks among them (1: it is also the real best), and the judge's
    split-half agreement: the same Spearman between the plans' KL on either half of the judge's
    sequences, the noise floor of any ranking on these tokens, and the judge's ceiling, about the
    Spearman a perfect objective could reach on them (√(2r/(1+r)) for split-half r).
    """
    from windq.errors import InputError
    from windq.models.gguf_model import GGUFModel
    from windq.pipeline import fidelity
    from windq.pipeline.alignment import aligned_workspace
    from windq.pipeline.planner import check_calibration_folder

    try:
        bpws = [float(b) for b in budgets.split(",")]
    except ValueError:
        raise InputError(f"--bpw {budgets}: comma-separated numbers, e.g. 4.6,5.0") from None
    objs = [o.strip() for o in objectives.split(",")]
    for o in objs:
        if o not in FIDELITY_OBJECTIVES:
            raise InputError(f"--objective {o}: use one of {', '.join(FIDELITY_OBJECTIVES)}")
    if relinearize < 0:
        raise InputError(f"--relinearize {relinearize}: use 0 or more")
    if rivals < 2 or tokens < 256:
        raise InputError("--rivals must be at least 2 and --tokens at least 256")
    check_calibration_folder(stats)
    src = GGUFModel(_model_path(model))
    if align != "none":
        src, stats = aligned_workspace(src, stats, align)
    bars = {}

    def progress(stage, done, total):
        bars.setdefault(stage, _progress(stage, unit="tensor" if stage.endswith("expansion") else {"tables": "job"}.get(stage, "plan")))(done, total)

    rows = fidelity.run(src, stats, bpws, rivals=rivals, objectives=tuple(objs), exclude_source=exclude_source, tokens=tokens, seed=seed,
                        threads=threads or None, relinearize=relinearize, progress=progress)  # fmt: skip
    if as_json:
        click.echo(json.dumps([{
            "bpw": r.bpw, "objective": r.objective, "spearman": r.spearman, "optimum_rank": r.optimum_rank, "plans": len(r.real),
            "tokens": r.tokens, "real_kl": r.real.tolist(), "predicted": r.predicted.tolist(), "bits": r.bits.tolist(),
            "judge_split_half": r.judge_split_half, "judge_ceiling": r.judge_ceiling,
        } for r in rows], indent=2))  # fmt: skip
        return
    click.echo(f"{'bpw':>5}  {'objective':9}  {'spearman':>8}  {'optimum rank':>12}  {'optimum KL':>10}  {'best KL':>9}  plans  tokens  judge split-half  judge ceiling")
    for r in rows:
        click.echo(f"{r.bpw:5.2f}  {r.objective:9}  {r.spearman:8.3f}  {r.optimum_rank:>6} of {len(r.real):<3}  {r.real[0]:10.5f}  {r.real.min():9.5f}  {len(r.real):5}  {r.tokens:6}  {r.judge_split_half:16.3f}  {r.judge_ceiling:13.3f}")


@main.command("quantize", epilog=EPILOG_MODEL)
@click.argument("model")
@click.option("--size", help="Budget for the whole file, metadata included: 60MB, 57.5MiB, 1.2GB (B, KB, MB, GB, KiB, MiB, GiB).")
@click.option("--bpw", type=float, help="Budget as bits per weight over every tensor's bytes (instead of --size).")
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="GGUF file to write; nothing appears there unless it fits and checks.")
@click.option("--text", default="wiki", show_default=True, help=TEXT_HELP.replace("for eval", "for eval, the calibration split here"))
@click.option("--tokens", default=16384, show_default=True, help="Calibration tokens (as `windq calibrate --tokens`).")
@click.option("--stats", type=click.Path(file_okay=False), help="Use this folder from `windq calibrate` instead of the cache.")
@click.option("--cache", type=click.Path(file_okay=False), help="Where calibrations are kept, keyed by model, text and settings (default: ~/.cache/windq/calibrations).")
@click.option("--method", type=click.Choice(list(METHODS)), default="knapsack", show_default=True, help="As `windq plan --method`.")
@click.option("--objective", type=click.Choice(OBJECTIVES), default="kl", show_default=True, help="As `windq plan --objective`.")
@click.option("--types", help="Comma-separated ggml types to allow (default: every legal one).")
@click.option("--exclude-source", is_flag=True, help="Never plan a tensor in its source type.")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Measure the plan against the best uniform plan and llama.cpp's mixes on held-in tokens; keep the best.")
@click.option("--verify-mixes", help="Comma-separated llama.cpp mixes to verify against (default: all 24 that llama-quantize offers, IQ1_S to Q8_0).")
@verify_tokens_option
@click.option("--sample-rows", type=click.IntRange(min=1), help="As `windq plan --sample-rows` (tables from about N rows of each larger tensor).")
@click.option("--align", "align", type=AlignWidth("auto", "none"), default="auto", show_default=True, help="As `windq plan --align`.")
@click.option("--save-plan", type=click.Path(dir_okay=False), help="Also write the plan.json.")
@click.option("--seed", default=0, show_default=True, help="Seed for ppo.")
@threads_option
@stream_option
def quantize_cmd(model, size, bpw, out, text, tokens, stats, cache, method, objective, types, exclude_source, verify, verify_mixes,
                 verify_tokens, sample_rows, align, save_plan, seed, threads, stream) -> None:  # fmt: skip
    """Quantize MODEL to fit a size: calibrate, plan, verify, export and check, in one command.

    \b
      windq quantize default --size 60MB -o smollm2-60mb.gguf
      windq quantize model.gguf --bpw 4.5 -o model-4.5.gguf --exclude-source

    The calibration is cached (by the model's and the text's sha256 and the settings), so a second
    budget for the same model starts at the plan. --size counts the whole file; if llama.cpp's
    file comes out over it, the plan is made again with the excess taken off.
    """
    from windq import registry
    from windq.models.gguf_model import GGUFModel
    from windq.models.sources import resolve_text
    from windq.pipeline.calibrate import CalibrationConfig
    from windq.pipeline.planner import PlanConfig
    from windq.pipeline.quantize import Budget, quantize
    from windq.pipeline.report import candidates_table, summary
    from windq.plan import save_plan as write_plan
    from windq.sizes import format_size, parse_size

    budget = Budget(size=parse_size(size) if size else None, bpw=bpw)
    if stats:
        from windq.pipeline.planner import check_calibration_folder

        check_calibration_folder(stats)
    allowed = tuple(registry.get(t.strip()).name for t in types.split(",")) if types else None
    mixes = _mixes(verify_mixes)
    cfg = PlanConfig(
        bpw=0.0, method=method, types=allowed, seed=seed, threads=threads or None, objective=objective,
        exclude_source=exclude_source, verify=verify, verify_tokens=verify_tokens, verify_mixes=mixes, sample_rows=sample_rows, stream=stream,
    )  # fmt: skip
    bars = {}

    def progress(stage, done, total):
        bars.setdefault(stage, _progress(stage, unit={"tables": "job", "ppo": "step", "mixes": "mix", "verify": "plan"}.get(stage, "chunk")))(done, total)

    src = GGUFModel(_model_path(model))
    r = quantize(
        src, resolve_text(text, "calibration"), out, budget, cfg, calibration=CalibrationConfig(tokens=tokens, threads=threads or os.cpu_count() or 1, stream=stream),
        statsdir=stats, cache=cache, align=align, progress=progress,
    )  # fmt: skip
    click.echo(f"calibration: {r.statsdir} ({'made now' if r.calibrated else 'cached'})")
    _echo_alignment(r.planned)
    for line in summary(r.plan, r.planned.result.proxy_error, None, r.planned.result.ppo):
        click.echo(line)
    for line in candidates_table(r.plan):
        click.echo(line)
    if save_plan:
        write_plan(r.plan, save_plan)
    limit = f" (limit {format_size(budget.size)}, {r.attempts} plan{'s' if r.attempts > 1 else ''})" if budget.size else ""
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in r.seconds.items())
    click.echo(
        f"wrote {r.path}: {format_size(r.export.file_bytes)} = {r.export.file_bytes:,} bytes{limit}, "
        f"{r.export.bits_per_weight:.3f} bits per weight; {stages}"
    )


@main.command("align", epilog=EPILOG_MODEL)
@click.argument("model")
@click.option("--to", type=AlignWidth(), default=256, show_default=True, help="Pad widths to a multiple of this (256: K and IQ blocks).")
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="Aligned F32 GGUF to write.")
def align_cmd(model: str, to: int, out: str) -> None:
    """Zero-pad MODEL's widths so K and IQ types fit its rows, computing exactly the same function.

    Llama family only. The hidden width is padded (576 → 768 on SmolLM2), whole dummy heads are
    added with one dummy KV head per group, and RMSNorm is compensated exactly. Bits per weight of
    anything made from the aligned file count only the real weights.
    """
    from windq.models.align import align_gguf
    from windq.models.gguf_model import GGUFModel

    r = align_gguf(GGUFModel(_model_path(model)), out, to)
    b, a = r.before, r.after
    click.echo(
        f"aligned: width {b.n_embd} → {a.n_embd}, heads {b.n_head}/{b.n_head_kv} → {a.n_head}/{a.n_head_kv}, "
        f"ffn {b.n_ff} → {a.n_ff}; {r.real_weights:,} real weights stored as {r.stored_weights:,} "
        f"(+{100 * (r.stored_weights / r.real_weights - 1):.1f} % padding) → {r.path}"
    )


@main.command("split", epilog=EPILOG_MODEL)
@click.argument("model")
@click.option("--stats", required=True, type=click.Path(file_okay=False), help="MODEL's folder from `windq calibrate`: ranks the neurons, and is sliced into the split model's.")
@click.option("--salient", required=True, type=click.IntRange(min=1), help="Neurons per FFN in the first group (each layer's most salient). Keep both groups multiples of 256 so K and IQ types stay legal.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for model.gguf (the split model, F32) and stats/ (its calibration).")
def split_cmd(model: str, stats: str, salient: int, out: str) -> None:
    """Rewrite MODEL so every feed-forward block is two neuron groups that can carry two types.

    Llama family only. The file is llama.cpp's granitemoe architecture: each FFN's most salient
    neurons (by E[h²]·‖W_down[:, j]‖² on the calibration) become a shared expert, the rest one
    routed expert whose gate weight is exactly 1, so stock llama.cpp computes the same function.
    Plan it like any model: `windq plan OUT/model.gguf --stats OUT/stats --align none --no-verify`
    (the verification runs models in torch, which windq cannot do for this layout).
    """
    from windq.models.gguf_model import GGUFModel
    from windq.pipeline.split import split_workspace

    report, statsdir = split_workspace(GGUFModel(_model_path(model)), stats, salient, out)
    click.echo(
        f"split: each FFN's {report.n_ff} neurons → {report.salient} salient + {report.n_ff - report.salient} others; "
        f"{report.path} with its calibration in {statsdir}"
    )


@main.command("convert")
@click.argument("hf_dir", type=click.Path())
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="GGUF file to write (atomically).")
@click.option("--outtype", type=click.Choice(["f32", "f16"]), default="f32", show_default=True, help="Type of the 2-D weights; norms stay F32.")
def convert_cmd(hf_dir: str, out: str, outtype: str) -> None:
    """Convert an HF llama-family checkpoint folder (LlamaForCausalLM, MistralForCausalLM) to GGUF.

    HF_DIR holds config.json, *.safetensors (or pytorch_model*.bin) and tokenizer.json, as written
    by `save_pretrained` or downloaded from the hub. The llama.cpp pre-tokenizer is chosen by
    checking that llama.cpp tokenizes a probe text exactly as the HF tokenizer does; a tokenizer
    no llama.cpp pre-tokenizer reproduces is refused.

    \b
    Example:
      windq convert ./SmolLM2-135M-Instruct -o smollm2-f32.gguf
      windq align smollm2-f32.gguf -o smollm2-aligned.gguf
    """
    from windq.models.convert import convert_hf

    r = convert_hf(hf_dir, out, outtype=outtype, progress=_progress("convert", unit="tensor"))
    click.echo(f"converted {r.architecture}: {r.n_tensors} tensors, {r.n_weights:,} weights ({r.outtype}), vocabulary {r.vocab} → {r.path}")


@main.command("export", epilog=EPILOG_MODEL)
@click.argument("model")
@click.option("--plan", "plan_path", required=True, type=click.Path(dir_okay=False), help="plan.json from `windq plan`.")
@click.option("--gguf", "out", required=True, type=click.Path(dir_okay=False), help="GGUF file to write (atomically).")
@click.option("--imatrix", type=click.Path(dir_okay=False), help="imatrix GGUF (windq calibrate or llama-imatrix).")
@click.option("--recipe", type=click.Path(dir_okay=False), help="Also write the plan as a --tensor-type-file for llama-quantize.")
@click.option("--align", "align_to", type=AlignWidth(), help="Align MODEL first (as `windq align --to WIDTH`). Not needed for a plan from `windq plan --align`: it records the alignment and export redoes it.")
@threads_option
def export_cmd(model: str, plan_path: str, out: str, imatrix: str | None, recipe: str | None, align_to: int | None, threads: int) -> None:
    """Write MODEL quantized as the plan says, through llama.cpp's own quantizer.

    The plan is checked against the model first (every tensor named, every type legal for its
    row length); after writing, every tensor's type is read back and compared with the plan.
    A plan made for MODEL's aligned twin re-aligns MODEL (the transform is deterministic, and the
    plan's sha256 check confirms the result) and zero-pads an --imatrix made for MODEL.
    """
    import tempfile

    from windq.errors import CalibrationError, InputError
    from windq.export.quantize import export_gguf, write_recipe
    from windq.models.align import align_gguf, pad_imatrix
    from windq.models.gguf_model import GGUFModel
    from windq.pipeline.imatrix import load_imatrix
    from windq.plan import load_plan

    plan = load_plan(plan_path)
    if imatrix and not Path(imatrix).is_file():  # before the model is parsed (seconds on a large vocabulary)
        raise InputError(f"{imatrix}: no such imatrix file")
    with tempfile.TemporaryDirectory(dir=Path(out).parent if Path(out).parent.is_dir() else None) as tmp:
        original = src = GGUFModel(_model_path(model))
        planned_align = plan.provenance.get("align") or {}
        if not align_to and planned_align.get("source_sha256") == src.sha256:
            align_to = planned_align["to"]  # the plan is for this model's aligned twin: remake it
        if align_to:
            src = GGUFModel(align_gguf(src, Path(tmp) / "aligned.gguf", align_to).path)
        im = None
        if imatrix:
            try:
                im = load_imatrix(imatrix, src).data
            except CalibrationError:
                if src is original:
                    raise
                im = pad_imatrix(load_imatrix(imatrix, original).data, src)  # the unaligned model's imatrix
        report = export_gguf(src, plan, out, imatrix=im, threads=threads or None)
        del src, original
    if recipe:
        write_recipe(plan, recipe)
    click.echo(
        f"wrote {report.path}: {report.file_bytes / 1e6:.2f} MB, {report.bits_per_weight:.3f} bits per weight "
        f"({', '.join(f'{n}×{t}' for t, n in plan.type_counts().items())})"
    )


@main.command("eval", epilog=EPILOG_MODEL.replace("MODEL is", "MODEL and --ref are"))
@click.argument("model")
@click.option("--ref", help="Reference GGUF for KLD and top-1 agreement (`default` for the embedded model).")
@click.option("--text", default="wiki", show_default=True, help=TEXT_HELP)
@click.option("--ctx", default=512, show_default=True, help="Tokens per chunk; the second half of each is scored.")
@click.option("--chunks", type=int, default=64, show_default=True, help="Chunks to evaluate at most (0 = all).")
@threads_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def eval_cmd(model: str, ref: str | None, text: str, ctx: int, chunks: int, threads: int | None, as_json: bool) -> None:
    """Perplexity of MODEL (and KLD against --ref) computed by llama.cpp as llama-perplexity does."""
    from windq.evaluators.perplexity import evaluate
    from windq.models.sources import resolve_text

    t = resolve_text(text, "evaluation")
    r = evaluate(
        _model_path(model), t.content, text_name=t.name, ctx=ctx, max_chunks=chunks or None,
        ref_path=_model_path(ref) if ref else None, threads=threads or None, progress=_progress("eval"),
    )  # fmt: skip
    if as_json:
        click.echo(json.dumps(r.to_dict(), indent=1))
        return
    line = f"PPL {r.ppl:.4f} ± {r.ppl_stderr:.4f} over {r.n_scored} tokens ({r.n_chunks} chunks of {r.ctx}, {r.text})"
    if r.kld is not None:
        line += f"\nKLD {r.kld:.5f} (median {r.kld_median:.5f}), top-1 agreement {100 * r.top1:.2f} % vs {Path(r.ref).name}"
    click.echo(line)


@main.command("bench")
@click.option("--model", default="default", show_default=True, help="Model to bench (its aligned twin too).")
@click.option("--out", default="runs/bench", show_default=True, type=click.Path(file_okay=False), help="Output and cache folder.")
@click.option("--quick", is_flag=True, help="A CI-sized run: one budget, two mixes, two chunks.")
@click.option("--budgets", help="Comma-separated bits-per-weight budgets (default 3.0 … 5.5 in steps of 0.5).")
@click.option("--methods", help="Comma-separated windq methods NAME[@chunk:G][+verify][+exclude][+policy], e.g. uniform,knapsack+verify,uniform+exclude,knapsack@chunk:256 (+verify: the verified choice; +exclude: source type never planned; ppo+policy: --policy applied, not trained).")
@click.option("--mixes", help="Comma-separated llama.cpp mixes (default: Q2_K … Q8_0, eleven of them).")
@click.option("--variants", help="unaligned, aligned, split:N (the FFN-split model, N salient neurons per FFN; no stock mixes, no +verify or ppo); default unaligned,aligned.")
@click.option("--chunks", type=int, help="512-token held-out chunks per evaluation (default 128: 32,640 scored tokens).")
@click.option("--policy", type=click.Path(dir_okay=False), help="A policy saved by `windq plan --save-policy` (perhaps on another model), which method ppo+policy applies without training.")
@click.option("--fidelity", "fidelity_rivals", type=click.IntRange(min=0),
              help="At every budget and variant, also measure the objective's fidelity (`windq fidelity`) over the optimum and this many near-optimal rivals (0: not measured; default 0, 2 with --quick).")
def bench_cmd(model, out, quick, budgets, methods, mixes, variants, chunks, policy, fidelity_rivals) -> None:
    """Quality versus size, and cost, of windq's plans against llama.cpp's stock mixes.

    Every file is built first (cached in OUT/results), then all are evaluated by llama.cpp in
    lockstep, one 512-token chunk at a time, each chunk's scores cached in OUT/evals: stop it at
    any time, and a rerun goes on from the last chunk; a smaller --chunks is served from the
    cache. Writes OUT/bench.md, OUT/pareto-ppl.png, OUT/pareto-kld.png.
    """
    import dataclasses

    from windq.evaluators.bench import BenchConfig, quick_config, run_bench

    cfg = quick_config(model) if quick else BenchConfig(model=model)
    split = lambda v: tuple(x.strip() for x in v.split(","))  # noqa: E731
    changes = {}
    if budgets:
        changes["budgets"] = tuple(float(b) for b in split(budgets))
    if methods:
        changes["methods"] = split(methods)
    if mixes:
        changes["mixes"] = split(mixes)
    if variants:
        changes["variants"] = split(variants)
    if chunks:
        changes["chunks"] = chunks
    if policy:
        changes["policy"] = policy
    if fidelity_rivals is not None:
        changes["fidelity_rivals"] = fidelity_rivals
    cfg = dataclasses.replace(cfg, **changes)
    result = run_bench(cfg, out, progress=lambda msg: click.echo(f"… {msg}", err=True))
    click.echo(result["table"])
    click.echo(f"wrote {Path(out) / 'bench.md'}, {Path(out) / 'pareto-ppl.png'}, {Path(out) / 'pareto-kld.png'}")


@main.command("doctor", epilog=EPILOG_MODEL)
@click.argument("model", default="default")
@click.option("--tokens", default=8, show_default=True, help="Tokens to decode.")
def doctor_cmd(model: str, tokens: int) -> None:
    """Check that this machine's llama.cpp build runs: decode a few tokens of MODEL in a child process.

    A build of llama.cpp that crashes on this CPU (the AMX kernels on Sapphire Rapids and later
    Xeons segfault in llama_decode) is named in one line, with the fix, instead of killing a long
    run later. `make demo` and `make test` run it first.
    """
    from windq import llamacpp

    r = llamacpp.probe(_model_path(model), tokens)
    amx = "compiled in" if r.amx_compiled else "not compiled"
    click.echo(
        f"llama.cpp OK: decoded {r.n_tokens} tokens of {Path(r.model).name} in a child process ({r.seconds:.1f} s); "
        f"CPU: {r.cpu}; llama-cpp-python {llamacpp.version()}, AMX kernels {amx}"
    )


@main.command("demo")
@click.option("--out", default="runs/demo", show_default=True, type=click.Path(file_okay=False), help="Folder for the outputs.")
@click.option("--type", "type_name", default="Q8_0", show_default=True, help="The uniform type to plan.")
@click.option("--chunks", default=16, show_default=True, help="512-token chunks of held-out text to evaluate.")
def demo_cmd(out: str, type_name: str, chunks: int) -> None:
    """The main job on the embedded default: uniform plan → GGUF by llama.cpp → PPL and KLD."""
    from windq.evaluators.perplexity import evaluate
    from windq.export.quantize import export_gguf
    from windq.models.gguf_model import GGUFModel
    from windq.models.sources import default_model_path, wiki_text
    from windq.plan import save_plan, uniform_plan
    from windq.registry import bits_per_weight

    outdir = Path(out)
    src = GGUFModel(default_model_path())
    plan = uniform_plan(src, type_name)
    save_plan(plan, outdir / "plan.json")
    click.echo(f"plan: {type_name} on all {len(plan.tensors)} quantizable tensors → {outdir / 'plan.json'}")
    report = export_gguf(src, plan, outdir / f"model-{type_name}.gguf")
    click.echo(f"export: {report.path}")
    text = wiki_text("evaluation")
    rows = []
    for label, path, ref in (("source (Q4_1, reference)", src.path, None), (f"windq uniform {type_name}", report.path, src.path)):
        r = evaluate(path, text.content, text_name=text.name, max_chunks=chunks, ref_path=ref, progress=_progress(label))
        m = GGUFModel(path)
        rows.append((label, os.path.getsize(path) / 1e6, bits_per_weight(m.nbytes, m.n_real_weights), r))
    click.echo(f"\nheld-out {text.name}, {rows[0][3].n_scored} scored tokens, ctx 512\n")
    click.echo("| model | size (MB) | bits/weight | PPL | KLD vs source | top-1 |")
    click.echo("|---|---:|---:|---:|---:|---:|")
    for label, mb, bpw, r in rows:
        kld = "—" if r.kld is None else f"{r.kld:.5f}"
        top1 = "—" if r.top1 is None else f"{100 * r.top1:.2f} %"
        click.echo(f"| {label} | {mb:.2f} | {bpw:.3f} | {r.ppl:.4f} | {kld} | {top1} |")


if __name__ == "__main__":
    main()
