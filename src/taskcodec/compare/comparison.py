"""The whole ``taskcodec compare``: options, run selection, curves, BD tables, files, and the
comparison run logged in MLflow."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from taskcodec.compare.bd import BDRow, _check_method, bd_table, pick_anchor
from taskcodec.compare.curves import (
    RATE,
    Curve,
    aggregate_replicates,
    anchor_curve,
    check_rate,
    curves_from_runs,
    data_label,
    data_sets,
    load_reference,
    parse_group_by,
    shared_metrics,
)
from taskcodec.compare.images import (
    ImageBootstrapRow,
    check_resamples,
    fetch_per_image,
    image_bootstrap,
)
from taskcodec.compare.report import (
    format_bd,
    format_curves,
    format_image_bootstrap,
    format_paired,
    markdown_bd,
    markdown_image_bootstrap,
    markdown_paired,
    write_image_bootstrap,
    write_outputs,
    write_paired,
)
from taskcodec.compare.selection import run_ids_tag, select_runs
from taskcodec.compare.statistics import CONFIDENCE, PairedRow, check_confidence, paired_table
from taskcodec.config import parse_anchors
from taskcodec.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class CompareOptions:
    """What ``taskcodec compare`` was asked for (see its --help)."""

    experiment: str = ""  # default: $MLFLOW_EXPERIMENT_NAME or "taskcodec"
    filter_string: str = ""
    run_ids: tuple[str, ...] = ()
    tags: dict[str, str] = field(default_factory=dict)
    group_by: str = "method"
    anchor: str = ""
    metrics: tuple[str, ...] = ()
    references: tuple[str, ...] = ()
    jpeg: bool = False
    anchors: tuple[str, ...] | str = ()  # jpeg, webp, avif (or a comma list): their curves
    mix_data: bool = False  # put runs evaluated on different data into one curve
    bd_method: str = "pchip"
    rate: str = RATE
    output_dir: Path | None = None
    run_name: str = ""
    replicates_by: str = ""  # tag/param (seed): runs at one operating point -> mean ± CI
    pair_by: str = ""  # tag/param (seed): BD per seed against the same seed's anchor
    equivalence_margin: float | None = None  # TOST margin, in each quantity's unit
    pareto: bool = False  # BD between operational RD curves (Pareto fronts)
    confidence: float = CONFIDENCE
    bootstrap_images: int = 0  # resamples of the evaluation images (0: no image bootstrap)
    bootstrap_seed: int = 0  # seeds the resamples' generator

    def __post_init__(self) -> None:
        _check_method(self.bd_method)
        parse_group_by(self.group_by)
        check_rate(self.rate)
        check_confidence(self.confidence)
        given = self.anchors if isinstance(self.anchors, str) else ",".join(self.anchors)
        self.anchors = parse_anchors(given, f"--anchors {given!r}")
        if self.replicates_by and self.pair_by and self.replicates_by != self.pair_by:
            raise ConfigError(f"--replicates-by {self.replicates_by!r} and --pair-by "
                              f"{self.pair_by!r} name different keys; replicates are paired "
                              "by the key that tells them apart")
        if self.equivalence_margin is not None and not self.equivalence_margin > 0:
            raise ConfigError(f"--equivalence-margin {self.equivalence_margin!r} should be > 0")
        if self.equivalence_margin is not None and not self.pair_by:
            raise ConfigError("--equivalence-margin tests paired replicates: give --pair-by too")
        check_resamples(self.bootstrap_images)
        if self.bootstrap_images and self.replicate_key:
            raise ConfigError("--bootstrap-images resamples the images of single runs; with "
                              f"--{'pair-by' if self.pair_by else 'replicates-by'} the seeds "
                              "are the replicates (drop one of the two)")
        if self.bootstrap_seed < 0:
            raise ConfigError(f"--bootstrap-seed {self.bootstrap_seed} should be >= 0")

    @property
    def replicate_key(self) -> str:
        return self.pair_by or self.replicates_by

    @property
    def anchor_names(self) -> tuple[str, ...]:
        """The anchors to draw: --anchors, and JPEG with --jpeg."""
        return tuple(dict.fromkeys((("jpeg",) if self.jpeg else ()) + self.anchors))


@dataclass
class Comparison:
    run_id: str
    experiment_id: str
    curves: list[Curve]
    metrics: list[str]
    anchor: str
    rows: list[BDRow]
    files: list[Path]
    compared_run_ids: list[str]
    text: str
    ratios: list = field(default_factory=list)  # ideal_gain.RatioRow
    paired: list[PairedRow] = field(default_factory=list)
    image_bootstrap: list[ImageBootstrapRow] = field(default_factory=list)


def _resolve_experiment(client, name: str, create: bool = False):
    experiment = client.get_experiment_by_name(name)
    if experiment is None and create:  # published curves alone: the comparison run's home
        return client.get_experiment(client.create_experiment(name))
    if experiment is None:
        known = [e.name for e in client.search_experiments()]
        raise ConfigError(f"no experiment {name!r} at {client.tracking_uri} "
                          f"(experiments: {', '.join(known) or 'none'})")
    return experiment


def build_curves(runs: Sequence, options: CompareOptions) -> list[Curve]:
    """Run curves, then the reference files, then the anchors (JPEG, WebP, AVIF); names are
    unique. With a replicate key, a run curve's points keep their seed (see
    :func:`aggregate_replicates`)."""
    curves = curves_from_runs(runs, options.group_by, options.rate, mix_data=options.mix_data,
                              replicate_key=options.replicate_key)
    curves += [load_reference(p) for p in options.references]
    curves += anchor_curves(runs, options.anchor_names, mix_data=options.mix_data)
    seen: dict[str, int] = {}
    unique = []
    for c in curves:
        seen[c.name] = seen.get(c.name, 0) + 1
        unique.append(c if seen[c.name] == 1 else Curve(f"{c.name} ({seen[c.name]})", c.points,
                                                         c.source))
    return unique


def anchor_curves(runs: Sequence, anchors: Sequence[str], *, mix_data: bool = False
                  ) -> list[Curve]:
    """A curve per anchor and data set from the points evaluate measured beside the runs. An
    anchor no run measured (AVIF where Pillow lacks it) is left out with a warning; none
    measured at all is an error."""
    labels = data_sets(runs)
    by_data = ([list(runs)] if mix_data or len(labels) == 1 else
               [[r for r in runs if data_label(r) == label] for label in labels])
    curves, missing = [], []
    for anchor in anchors:
        found = [(c, group) for group in by_data if (c := anchor_curve(group, anchor))]
        if not found:
            missing.append(anchor)
        curves += [c if len(by_data) == 1 else
                   Curve(f"{c.name} @ {data_label(group[0])}", c.points, c.source)
                   for c, group in found]
    if missing and not curves:
        raise ConfigError(f"--anchors {','.join(anchors)}: none of the selected runs logged "
                          f"{' or '.join(f'{a}_bpp' for a in missing)} (evaluate them with "
                          f"--anchors {','.join(anchors)})")
    for anchor in missing:
        log.warning("--anchors: no selected run logged %s_bpp (evaluated without that anchor, "
                    "or where Pillow cannot code it); no %s curve", anchor, anchor.upper())
    return curves


def choose_metrics(curves: Sequence[Curve], wanted: Sequence[str]) -> list[str]:
    available = sorted(set().union(*(c.metric_names() for c in curves)))
    if wanted:
        missing = [m for m in wanted if m not in available]
        if missing:
            raise ConfigError(f"--metric {', '.join(missing)}: not logged by the compared runs "
                              f"(available: {', '.join(available) or 'none'})")
        return list(wanted)
    metrics = shared_metrics(curves)
    if not metrics:
        raise ConfigError("the compared runs share no quality metric "
                          f"(seen: {', '.join(available) or 'none'}); choose one with --metric")
    return metrics


def _log_run(client, experiment_id: str, files: Sequence[Path], options: CompareOptions, *,
             experiment: str, anchor: str, metrics: Sequence[str], curves: int,
             run_ids: Sequence[str], note: str) -> str:
    """Log ``files`` under ``comparison/`` of a new run (or of the run ``mlflow run`` opened for
    this entry point); only these files, whatever else the output folder holds.

    BD values are artifacts and the run's description, not metrics: metrics of a comparison
    run would add charts to the experiment's chart view, crowding out the bpp/PSNR scatter.
    """
    from mlflow.entities import Param, RunTag

    from taskcodec import tracking

    tags = {"comparison": "true", "entry_point": "compare", "compared_run_ids": run_ids_tag(run_ids),
            "mlflow.note.content": note, **tracking.environment_tags()}
    params = {"experiment": experiment, "filter": options.filter_string[:500],
              "group_by": options.group_by, "anchor": anchor, "bd_method": options.bd_method,
              "rate": options.rate,
              "metrics": ",".join(metrics)[:500], "curves": curves, "compared_runs": len(run_ids),
              "references": ",".join(Path(p).name for p in options.references)[:500],
              "jpeg": str(options.jpeg).lower(), "anchors": ",".join(options.anchor_names),
              "mix_data": str(options.mix_data).lower(),
              "replicates_by": options.replicates_by, "pair_by": options.pair_by,
              "equivalence_margin": options.equivalence_margin or "",
              "pareto": str(options.pareto).lower(), "confidence": options.confidence,
              "bootstrap_images": options.bootstrap_images,
              "bootstrap_seed": options.bootstrap_seed}
    run_id = os.environ.get("MLFLOW_RUN_ID", "")
    created = not run_id
    if created:
        run_id = client.create_run(experiment_id, run_name=options.run_name or None).info.run_id
    status = "FAILED"
    try:
        already = client.get_run(run_id).data.params
        client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()
                                         if k not in already],
                         tags=[RunTag(k, str(v)) for k, v in tags.items()])
        for path in files:
            client.log_artifact(run_id, str(path), "comparison")
        status = "FINISHED"
    finally:
        if created:
            with contextlib.redirect_stdout(sys.stderr):  # MLflow prints the run's URL on stdout
                client.set_terminated(run_id, status)
    return run_id


def compare(options: CompareOptions) -> Comparison:
    """Select runs, build curves, compute BD tables, write and log everything."""
    import tempfile

    from mlflow.tracking import MlflowClient

    from taskcodec import tracking
    from taskcodec.ideal_gain import format_ratios, ideal_gain_ratios, markdown_ratios

    uri = tracking.tracking_uri()
    tracking.check_reachable(uri)
    client = MlflowClient(tracking_uri=uri)
    name = options.experiment or tracking.experiment_name()
    only_references = bool(options.references) and not options.run_ids
    if options.run_ids:
        runs = select_runs(client, run_ids=options.run_ids, tags=options.tags)
        experiment_id = (_resolve_experiment(client, options.experiment).experiment_id
                         if options.experiment else runs[0].info.experiment_id if runs else "")
    else:
        experiment = _resolve_experiment(client, name, create=only_references)
        experiment_id = experiment.experiment_id
        runs = select_runs(client, experiment_ids=[experiment_id],
                           filter_string=options.filter_string, tags=options.tags)
    runs = [r for r in runs if options.rate in r.data.metrics]
    if not runs and not options.references:
        what = (f"runs {', '.join(options.run_ids)}" if options.run_ids
                else f"experiment {name!r}" + (f" matching {options.filter_string!r}"
                                               if options.filter_string else ""))
        raise ConfigError(f"no run with a {options.rate} metric among {what} at {uri} "
                          "(evaluate checkpoints first: taskcodec evaluate --checkpoint RUN_ID, "
                          "or compare published curves with --reference FILE)")
    if options.anchor_names and not runs:
        raise ConfigError(f"--anchors {','.join(options.anchor_names)}: no run was selected, so "
                          "there are no anchor points")
    if not experiment_id:
        experiment_id = _resolve_experiment(client, name, create=True).experiment_id
    raw = build_curves(runs, options)
    curves = ([aggregate_replicates(c, options.confidence) if c.source == "runs" else c
               for c in raw] if options.replicate_key else raw)
    metrics = choose_metrics(curves, options.metrics)
    anchor = pick_anchor(curves, options.anchor or None)
    rows = bd_table(curves, anchor, metrics, options.bd_method, pareto=options.pareto)
    ratios = ideal_gain_ratios(curves, metrics, options.bd_method)
    paired = []
    if options.pair_by:
        raw_anchor = next(c for c in raw if c.name == anchor.name)
        paired = paired_table(raw, raw_anchor, metrics, options.bd_method,
                              confidence=options.confidence, margin=options.equivalence_margin,
                              pareto=options.pareto)
    run_ids = sorted({r.info.run_id for r in runs})
    boot = (_image_bootstrap(client, curves, anchor, metrics, options)
            if options.bootstrap_images else [])
    text = "\n\n".join([format_curves(curves, metrics), format_bd(rows, anchor.name,
                                                                   options.bd_method)]
                        + ([format_ratios(ratios)] if ratios else [])
                        + ([format_paired(paired, options.pair_by)] if options.pair_by else [])
                        + ([format_image_bootstrap(boot)] if options.bootstrap_images else []))
    if len(data_sets(runs)) > 1:
        text += (f"\n\nThe runs were evaluated on {len(data_sets(runs))} data sets "
                 f"({', '.join(data_sets(runs))}): "
                 + ("--mix-data put them into the same curves." if options.mix_data else
                    "one curve per data set (--mix-data to group them anyway)."))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(options.output_dir) if options.output_dir else Path(tmp)
        files = write_outputs(curves, metrics, rows, folder, anchor=anchor.name,
                              method=options.bd_method, run_ids=run_ids, rate=options.rate,
                              ratios=ratios)
        if options.pair_by:
            files += write_paired(paired, folder, pair_by=options.pair_by,
                                  method=options.bd_method, confidence=options.confidence,
                                  margin=options.equivalence_margin)
        if options.bootstrap_images:
            files += write_image_bootstrap(boot, folder, method=options.bd_method)
        (folder / "summary.txt").write_text(text + "\n")
        files.append(folder / "summary.txt")
        run_id = _log_run(client, experiment_id, files, options,
                          experiment=name if not options.run_ids else options.experiment,
                          anchor=anchor.name, metrics=metrics, curves=len(curves),
                          run_ids=run_ids, note=markdown_bd(rows, anchor.name, options.bd_method)
                          + ("\n\n" + markdown_ratios(ratios) if ratios else "")
                          + ("\n\n" + markdown_paired(paired, options.pair_by)
                             if options.pair_by else "")
                          + ("\n\n" + markdown_image_bootstrap(boot) if boot else ""))
        if not options.output_dir:
            files = [Path("comparison") / f.name for f in files]  # only in MLflow now
    return Comparison(run_id, experiment_id, curves, metrics, anchor.name, rows, files,
                      run_ids, text, ratios, paired, boot)


def _image_bootstrap(client, curves: Sequence[Curve], anchor: Curve, metrics: Sequence[str],
                     options: CompareOptions) -> list[ImageBootstrapRow]:
    """The bootstrap over images of every run curve against the anchor, from the per-image
    results the compared runs logged."""
    import tempfile

    run_ids = [p.run_id for c in curves if c.source == "runs" for p in c.points]
    with tempfile.TemporaryDirectory() as tmp:
        tables, missing = fetch_per_image(client, run_ids, Path(tmp))
    return image_bootstrap(curves, anchor, metrics, tables, missing=missing, rate=options.rate,
                           method=options.bd_method, resamples=options.bootstrap_images,
                           seed=options.bootstrap_seed, confidence=options.confidence,
                           pareto=options.pareto)
