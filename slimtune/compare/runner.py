"""`slimtune compare`: every row of a comparison trained and evaluated in its own processes, on the same data,
split, seed and budget; one result file per row, so an interrupted compare goes on where it stopped.

Folder layout (DIR = --output):
    config.yaml          the shared config every row starts from (a second run must find the same)
    heldout.jsonl        the held-out records every row is scored on (unless data.eval names a file)
    sft-*.jsonl          on preference pairs: the chosen answers an sft row trains on (compare/pairs.py)
    runs/<label>/        the row's `slimtune train` folder; runs/<label>/compare-eval its `slimtune eval`
    logs/<label>.*.log   each child's output; a failed row's reason is its log's last line
    child.json           the running child's PID (a compare killed where Linux's parent-death signal did not
                         stop its child: the next compare stops it first, see child.stop_orphan)
    .slimtune-lock       held by the compare running here (runs/ownership.Lock): one compare per folder
    results/<label>.json a finished row (done or failed): the marker a resumed compare skips on
"""
from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from .. import config as config_mod
from ..config import ConfigError
from ..data import DataError, build, read, split
from ..data.preference import build_pairs
from ..runs import checkpoint, ownership
from ..runs.ownership import RunFolderError
from ..methods.parts import PARTS
from ..runs.adapter import read_config
from ..methods import count_on_meta
from ..models import load_tokenizer
from . import child, pairs
from .spec import BASE, Comparison, Row, load_config, row_overrides


CHILD = "child.json"  # names the running child (child.run_measured's record)


WRITES = ("config.yaml", "heldout.jsonl", *pairs.SFT_FILES, "runs", "logs", "results", "compare.json", "compare.md",
          "compare.html")


class Interrupted(Exception):
    """compare was asked to stop (SIGINT/SIGTERM); the running child saved its checkpoint first."""


def _write_json(path: Path, obj: object) -> None:
    """Atomic: a killed compare never leaves half a result for the next one to trust."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _shared_config(comparison: Comparison, out: Path) -> Path:
    """DIR/config.yaml; a DIR holding another config's compare is refused (rows would not be comparable)."""
    path = out / "config.yaml"
    if path.is_file():
        diff = checkpoint.differences(read_config(out), comparison.cfg)
        if diff:
            raise ConfigError(f"{out}: holds a compare of another config ({'; '.join(diff[:3])}); use another "
                              "--output, or the same config to go on with that compare")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(config_mod.dump(comparison.cfg), encoding="utf-8")
    return path


def check_data(comparison: Comparison, where: str = "compare") -> None:
    """The records read, encoded and truncated as `slimtune train` does it (data.build), once per distinct
    model and data section among the rows, before any row starts: data that no row can train on stops
    compare with train's own error, not after the base row's eval and one failed child per row."""
    seen, tokenizers = set(), {}
    for row in [None, *comparison.rows]:
        cfg = comparison.cfg if row is None or row.method == BASE else \
            load_config(config_mod.to_dict(comparison.cfg), where, row_overrides(row))
        key = json.dumps([cfg.model.path, config_mod.to_dict(cfg)["data"]], sort_keys=True, default=str)
        if key in seen:
            continue
        seen.add(key)
        path = cfg.model.path
        if path not in tokenizers:
            tokenizers[path] = load_tokenizer(path, cfg.model.trust_remote_code)
        try:
            sft_own = row is not None and comparison.objective(row) == "sft" and pairs.own_data(row.overrides)
            if comparison.pairs and not sft_own:  # the pairs, read as `slimtune train` reads them for the row
                build_pairs(cfg, tokenizers[path], log=lambda *a, **k: None)
            else:
                build(cfg.data, tokenizers[path], log=lambda *a, **k: None)
        except DataError as err:
            if cfg is comparison.cfg:
                raise
            raise DataError(f"compare.methods.{row.label}: {err}") from None  # the row's own data.* overrides


def _heldout(comparison: Comparison, out: Path) -> Path:
    """The held-out records, as `slimtune train` splits them (same reader, size and seed)."""
    cfg = comparison.cfg
    if comparison.pairs:
        return pairs.write_heldout(cfg, out)
    if cfg.data.eval:
        return Path(cfg.data.eval)
    skipped = [] if cfg.data.on_bad_record == "skip" else None
    examples = read(cfg.data.train, cfg.data.format, cfg.data.limit, skipped)
    _, held = split(examples, cfg.data.eval_size, cfg.data.seed)
    path = out / "heldout.jsonl"
    with path.open("w", encoding="utf-8") as fh:
        fh.writelines(json.dumps({"messages": ex.messages}, ensure_ascii=False) + "\n" for ex in held)
    return path


def _overrides(row: Row, run_dir: Path) -> list[str]:
    """The row's overrides for `slimtune train`. Generation is left to the eval child, which measures its
    time and memory; in-training evals keep their loss (the loss curves)."""
    return [*row_overrides(row), *row.data, f"train.output_dir={run_dir}", "train.eval_generate=false",
            "train.eval_separator="]


def _same_run(folder: Path | None, shared: Path, row: Row, run_dir: Path) -> bool:
    """Whether a run (or checkpoint) folder was trained with this row's config as it is now."""
    if folder is None or not (folder / "config.yaml").is_file():
        return False
    saved, now = read_config(folder), config_mod.load(shared, _overrides(row, run_dir))
    # train.lr may change on a resume (a diverged run goes on more gently); in a comparison it is the row's
    return not checkpoint.differences(saved, now) and saved.train.lr == now.train.lr


def _train_args(row: Row, shared: Path, run_dir: Path) -> list[str]:
    """The child's `slimtune train` command line."""
    args = ["train", str(shared), *_overrides(row, run_dir), "--no-progress"]
    if _same_run(checkpoint.latest(run_dir), shared, row, run_dir):
        return args + ["--resume"]  # a row stopped mid-run goes on from its checkpoint
    if run_dir.exists() and any(run_dir.iterdir()):
        # compare's own folder: a row killed before its first checkpoint, or one whose overrides changed
        # since (its results file deleted to run it again)
        return args + ["--overwrite"]
    return args


def _eval_args(comparison: Comparison, row: Row, run_dir: Path, data: Path) -> list[str]:
    cfg, tc = comparison.cfg, comparison.cfg.train
    if comparison.pairs:  # preference accuracy and mean margin of the run on the held-out pairs
        return ["eval", str(run_dir), "--data", str(data), "--output", str(run_dir / "compare-eval"), "--device",
                tc.device]
    args = ["eval", "--data", str(data), "--output", str(run_dir / "compare-eval"), "--device", tc.device,
            "--max-new-tokens", str(tc.eval_max_new_tokens), "--limit", str(tc.eval_max_records)]
    if row.method == BASE:
        args += ["--base", cfg.model.path, "--template", cfg.data.template, f"--system={cfg.data.system}",
                 "--max-len", str(cfg.data.max_len)]
    else:
        args.insert(1, str(run_dir))
    if tc.eval_separator:
        args += ["--extraction", f"--separator={tc.eval_separator}"]
    elif comparison.metric:
        args.append("--generate")
    return args


def _train(row: Row, shared: Path, out: Path, fwd: child.Forward, log: Callable[[str], None]) -> dict:
    """The train child's measurements (results/<label>.train.json, kept so a compare killed during the
    eval does not train again)."""
    run_dir, marker = out / "runs" / row.label, out / "results" / f"{row.label}.train.json"
    done = _read_json(marker)
    if done and not done["reason"] and (run_dir / "summary.json").is_file() and _same_run(run_dir, shared, row,
                                                                                        run_dir):
        return done  # trained, then stopped during its eval; a failed row is tried again
    log(f"compare: {row.label}: training ({row.method})")
    res = child.run_measured(_train_args(row, shared, run_dir), out / "logs" / f"{row.label}.train.log",
                    out / "logs" / f"{row.label}.train.peak.json", fwd, out / CHILD)
    summary = _read_json(run_dir / "summary.json")
    if res.interrupted and not (res.rc == 0 and summary):  # a run that finished anyway is recorded
        raise Interrupted(f"stopped while training {row.label}")
    reason = None if res.rc == 0 and summary else res.failure(out / "logs" / f"{row.label}.train.log")
    done = {"rc": res.rc, "wall_seconds": res.seconds, "rss_gib": res.rss_gib, "gpu": res.gpu, "reason": reason}
    _write_json(marker, done)
    return done


def _evaluate(comparison: Comparison, row: Row, out: Path, data: Path, fwd: child.Forward,
              log: Callable[[str], None]) -> tuple[dict, str | None]:
    """The eval child's scores and measurements, or the reason it failed."""
    run_dir = out / "runs" / row.label
    log(f"compare: {row.label}: evaluating on {data}")
    log_path = out / "logs" / f"{row.label}.eval.log"
    (run_dir / "compare-eval" / "scores.json").unlink(missing_ok=True)  # an earlier attempt's must not count
    res = child.run_measured(_eval_args(comparison, row, run_dir, data), log_path,
                             out / "logs" / f"{row.label}.eval.peak.json", fwd, out / CHILD)
    scores = _read_json(run_dir / "compare-eval" / "scores.json")
    if res.interrupted and not (res.rc == 0 and scores):
        raise Interrupted(f"stopped while evaluating {row.label}")
    if res.rc != 0 or scores is None:
        return {}, res.failure(log_path)
    metric = comparison.metric
    return {**(pairs.scores(scores) if comparison.pairs else {}),
            "eval_loss": scores.get("eval_loss"), "eval_records": scores.get("records"),
            "eval_tokens": scores.get("eval_tokens"),  # answer tokens the loss is over (report.loss_note)
            "score": scores[metric] / 100 if metric and metric in scores else None,  # scores.json is in percent
            "eval_seconds": scores.get("seconds"), "eval_wall_seconds": res.seconds, "infer_rss_gib": res.rss_gib,
            "infer_gpu_allocated_gib": res.gpu.get("peak_allocated_gib"),
            "infer_gpu_reserved_gib": res.gpu.get("peak_reserved_gib")}, None


def artifact_bytes(run_dir: Path) -> int:
    """What `slimtune train` saved to be used: the peft adapter or the trained parts (not checkpoints,
    logs or evals)."""
    return sum(p.stat().st_size for p in run_dir.iterdir()
               if p.is_file() and (p.name.startswith("adapter_") or p.name == PARTS))


def _trained(train: dict, run_dir: Path) -> dict:
    s = _read_json(run_dir / "summary.json") or {}
    total = s.get("total_params")
    gpu = train.get("gpu") or {}
    return {"trainable_params": s.get("trainable_params"), "total_params": total,
            "trainable_share": s["trainable_params"] / total if total else None,
            "train_rss_gib": train["rss_gib"],
            "train_gpu_allocated_gib": s.get("peak_allocated_gib", gpu.get("peak_allocated_gib")),
            "train_gpu_reserved_gib": s.get("peak_reserved_gib", gpu.get("peak_reserved_gib")),
            "train_seconds": s.get("train_seconds"), "train_wall_seconds": train["wall_seconds"],
            "tokens_per_s": s.get("input_tokens_per_s", s.get("tokens_per_s")), "steps": s.get("steps"),
            "train_loss": s.get("train_loss"),
            "artifact_bytes": artifact_bytes(run_dir)}


def _base_total(cfg: config_mod.Config) -> int | None:
    """The untrained row's parameter count, from config.json alone (meta device)."""
    try:
        return count_on_meta(cfg.model.path, config_mod.MethodConfig(name="full"), cfg.model.trust_remote_code)[1]
    except Exception:  # a count is a nicety: the row's scores stand without it
        return None


def run_row(comparison: Comparison, row: Row, out: Path, shared: Path, data: Path, fwd: child.Forward,
            log: Callable[[str], None]) -> dict:
    """Train (unless base) and evaluate one row; its result, also in results/<label>.json."""
    run_dir = out / "runs" / row.label
    result = {"label": row.label, "method": row.method, "overrides": row.overrides, "status": "done",
              "reason": None, "run_dir": str(run_dir), "metric": comparison.metric,
              "objective": comparison.objective(row)}
    if row.method == BASE:
        total = _base_total(comparison.cfg)
        result.update(trainable_params=0, total_params=total, trainable_share=0.0 if total else None)
    else:
        train = _train(row, shared, out, fwd, log)
        if train["reason"]:
            result.update(status="failed", reason=train["reason"], train_wall_seconds=train["wall_seconds"])
        else:
            result.update(_trained(train, run_dir))
    if result["status"] == "done":
        scores, reason = _evaluate(comparison, row, out, data, fwd, log)
        result.update(scores)
        if reason:
            result.update(status="failed", reason=f"eval: {reason}")
    _write_json(out / "results" / f"{row.label}.json", result)
    log(f"compare: {row.label}: {result['status']}" + (f": {result['reason']}" if result["reason"] else ""))
    return result


@contextlib.contextmanager
def _locked(out: Path, log: Callable[[str], None]) -> Iterator[None]:
    """The folder's lock for the compare's length: a second compare on a folder in use stops here, before it
    touches a child or a file."""
    out.mkdir(parents=True, exist_ok=True)
    lock = ownership.Lock(out, log)
    try:
        lock.__enter__()
    except RunFolderError:
        raise RunFolderError(f"--output: {out} is in use by another slimtune compare (PID "
                             f"{ownership.holder(out) or 'unknown'}); wait for it, stop it, or choose another "
                             "--output") from None
    try:
        yield
    finally:
        lock.__exit__(None, None, None)


def run_comparison(comparison: Comparison, out: Path, log: Callable[[str], None] = print) -> list[dict]:
    """Every row of the comparison, finished rows (results/<label>.json) skipped; the rows' results in order."""
    with _locked(out, log):
        child.stop_orphan(out / CHILD, log)  # an earlier compare's child still training here: it checkpoints
        return _rows(comparison, out, log)


def _rows(comparison: Comparison, out: Path, log: Callable[[str], None]) -> list[dict]:
    shared = _shared_config(comparison, out)
    data = _heldout(comparison, out)
    for row in comparison.rows:  # an sft row on pairs trains on their chosen answers (compare/pairs.py)
        sft_on_pairs = comparison.pairs and comparison.objective(row) == "sft" and not pairs.own_data(row.overrides)
        if sft_on_pairs and row.method != BASE:
            row.data = pairs.sft_overrides(out)
    results = []
    with child.Forward() as fwd:
        for row in comparison.rows:
            if fwd.requested:
                raise Interrupted(f"{fwd.requested} between rows, before {row.label}")
            done = _read_json(out / "results" / f"{row.label}.json")
            if done is not None:
                log(f"compare: {row.label}: finished earlier ({done['status']}), skipped; delete "
                    f"{out / 'results' / (row.label + '.json')} to run it again")
                results.append(done)
                continue
            results.append(run_row(comparison, row, out, shared, data, fwd, log))
    return results
