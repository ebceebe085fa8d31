"""``taskcodec compare``: RD curves and BD-rate tables over MLflow runs.

Only Click is imported here; mlflow, numpy and matplotlib wait inside the command, so
``taskcodec compare --help`` answers at once.
"""

from __future__ import annotations

from pathlib import Path

import click


def _split(values: tuple[str, ...]) -> tuple[str, ...]:
    """Repeatable options also take comma lists (one MLProject parameter holds several)."""
    return tuple(v.strip() for value in values for v in value.split(",") if v.strip())


def _parse_tags(ctx, param, values: tuple[str, ...]) -> dict[str, str]:
    tags = {}
    for value in values:
        if not value.strip():
            continue  # an MLProject parameter left empty
        name, sep, tag_value = value.partition("=")
        if not sep or not name.strip():
            raise click.BadParameter(f"{value!r} is not NAME=VALUE", ctx=ctx, param=param)
        tags[name.strip()] = tag_value.strip()
    return tags


def _optional_float(ctx, param, value: str) -> float | None:
    """A number, or nothing for an empty value (an MLProject parameter left empty)."""
    if not value.strip():
        return None
    try:
        return float(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a number", ctx=ctx, param=param) from None


@click.command()
@click.option("--experiment", "-e", default="", metavar="NAME",
              help="experiment to read runs from [default: $MLFLOW_EXPERIMENT_NAME or taskcodec]")
@click.option("--filter", "filter_string", default="", metavar="STR",
              help="MLflow search filter, e.g. \"params.N = '128'\"")
@click.option("--run-id", "run_ids", multiple=True, metavar="RUN_ID|MODEL",
              help="compare exactly these runs (repeatable, or a comma list); a registered "
                   "model (models:/NAME@ALIAS, models:/NAME/VERSION) stands for its "
                   "evaluate runs")
@click.option("--tag", "tags", multiple=True, metavar="NAME=VALUE", callback=_parse_tags,
              help="only runs with this tag value (repeatable), e.g. --tag method=mbt2018")
@click.option("--group-by", default="method", show_default=True, metavar="KEY[,KEY]",
              help="tag or param whose values make the curves (several: joined with /)")
@click.option("--anchor", default="", metavar="CURVE",
              help="curve the others are measured against [default: the first --reference, "
                   "else the first anchor (JPEG, WebP, AVIF), else the first curve by name]")
@click.option("--metric", "metrics", multiple=True, metavar="NAME",
              help="quality metric to compare (repeatable) [default: every metric the runs share]")
@click.option("--reference", "references", multiple=True, metavar="FILE",
              help="published RD points: a CompressAI results JSON or a CSV with a bpp column "
                   "(repeatable)")
@click.option("--jpeg", is_flag=False, flag_value="true", default="false", type=click.BOOL,
              metavar="[BOOL]",
              help="add the JPEG points evaluate measured next to each run as a curve "
                   "(as --anchors jpeg) [default: false]")
@click.option("--anchors", default="", metavar="NAME[,NAME]",
              help="add the points evaluate measured next to each run with these classical "
                   "codecs as curves: jpeg, webp, avif (e.g. --anchors jpeg,webp,avif)")
@click.option("--mix-data", is_flag=False, flag_value="true", default="false", type=click.BOOL,
              metavar="[BOOL]",
              help="put runs evaluated on different data sets (by content digest) into the "
                   "same curves [default: false: a curve per data set]")
@click.option("--bd-method", type=click.Choice(["pchip", "cubic"]), default="pchip",
              show_default=True,
              help="BD interpolation: piecewise cubic Hermite, or the classic cubic fit")
@click.option("--rate", default="bpp", show_default=True, metavar="METRIC",
              help="the rate axis: bpp (real bytes; scalable: what the method is charged), "
                   "bpp_enh, bpp_base, or the likelihoods' bpp_estimated, bpp_enh_estimated")
@click.option("--replicates-by", default="", metavar="KEY",
              help="tag or param telling replicates apart (e.g. seed): runs of a curve at "
                   "one operating point (λ/α) become one point, mean ± 95 % CI on both axes")
@click.option("--pair-by", default="", metavar="KEY",
              help="tag or param pairing runs (e.g. seed): BD-rate, BD-metric and ΔJ (bpp at "
                   "equal distortion) per seed against the same seed's anchor, then mean, sd, "
                   "t- and bootstrap intervals, effect size, t-test (implies --replicates-by)")
@click.option("--equivalence-margin", default="", callback=_optional_float, metavar="X",
              help="with --pair-by: two one-sided tests of |mean| < X (in each quantity's "
                   "unit: % for BD-rate, dB for BD-PSNR, bpp for ΔJ)")
@click.option("--bootstrap-images", type=click.IntRange(min=0), default=0, metavar="N",
              help="with N resamples (e.g. 1000) of the evaluation images: a percentile "
                   "interval of each curve's BD-rate and BD-metric against the anchor (curves "
                   "of single runs; from the per-image results evaluate logs) [default: 0, off]")
@click.option("--bootstrap-seed", type=click.IntRange(min=0), default=0, show_default=True,
              metavar="SEED", help="seed of the image resamples (numpy's default generator)")
@click.option("--pareto", is_flag=False, flag_value="true", default="false", type=click.BOOL,
              metavar="[BOOL]",
              help="BD between operational RD curves: each curve's Pareto front (the table "
                   "names the points dropped) [default: false]")
@click.option("--output-dir", default="", metavar="DIR",
              help="also keep the plots, CSV and JSON files here")
@click.option("--run-name", default="", metavar="NAME", help="name of the comparison run")
def compare(experiment: str, filter_string: str, run_ids: tuple[str, ...], tags: dict[str, str],
            group_by: str, anchor: str, metrics: tuple[str, ...], references: tuple[str, ...],
            jpeg: bool, anchors: str, mix_data: bool, bd_method: str, rate: str,
            replicates_by: str, pair_by: str, equivalence_margin: float | None,
            bootstrap_images: int, bootstrap_seed: int, pareto: bool, output_dir: str,
            run_name: str) -> None:
    """Compare runs as rate-distortion curves: RD plots and BD-rate / BD-metric tables.

    Evaluate runs are grouped into curves (by the method tag unless --group-by says
    otherwise), ordered by bpp, and for every quality metric they share (PSNR, MS-SSIM, task
    metrics) each curve is measured against the anchor. Plots (PNG, SVG), points and BD
    table (CSV, JSON) are logged to a new MLflow run tagged comparison=true. BD needs at
    least 4 points per curve and overlapping curves; otherwise the table says why. With
    curves of paper 1's lower and upper baselines (--group-by method: "lower", "upper"),
    every other curve of their group also gets paper 1's ratio (share of the ideal gain).
    Runs evaluated on different data sets are never one curve (names end in "@ DATA")
    unless --mix-data. Published curves (--reference) can be compared on their own.

    \b
    Examples:
      taskcodec compare --experiment taskcodec --anchor bmshj2018-factorized
      taskcodec compare --jpeg --anchor JPEG --group-by codec --output-dir rd/
      taskcodec compare --anchors jpeg,webp,avif --anchor JPEG --output-dir rd/
      taskcodec compare --filter "params.N = '128'" --reference kodak/jpeg.json
      taskcodec compare --tag method=mbt2018 --group-by metric --metric ms_ssim
      taskcodec compare --run-id RUN1 --run-id RUN2 --run-id RUN3 --run-id RUN4
      taskcodec compare --tag layer=scalable --group-by method,beta --anchor lower/0.0
      taskcodec compare --tag layer=scalable --rate bpp_estimated --metric psnr
      taskcodec compare --tag layer=scalable --group-by method --anchor lower --pair-by seed
      taskcodec compare --reference a.json --reference b.json
      taskcodec compare --tag layer=scalable --group-by method --anchor lower \\
        --bootstrap-images 1000
    """
    from taskcodec.compare import CompareOptions
    from taskcodec.compare import compare as run_comparison

    options = CompareOptions(
        experiment=experiment.strip(), filter_string=filter_string.strip(),
        run_ids=_split(run_ids), tags=tags, group_by=group_by, anchor=anchor.strip(),
        metrics=_split(metrics), references=tuple(r for r in references if r.strip()),
        jpeg=jpeg, anchors=anchors, mix_data=mix_data, bd_method=bd_method, rate=rate.strip(),
        replicates_by=replicates_by.strip(), pair_by=pair_by.strip(),
        equivalence_margin=equivalence_margin, bootstrap_images=bootstrap_images,
        bootstrap_seed=bootstrap_seed, pareto=pareto,
        output_dir=Path(output_dir) if output_dir.strip() else None, run_name=run_name)
    result = run_comparison(options)
    click.echo(result.text)
    click.echo()
    if options.output_dir:
        click.echo(f"Files: {options.output_dir}")
    click.echo(f"MLflow run: {result.run_id}")
