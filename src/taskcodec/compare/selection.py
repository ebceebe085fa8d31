"""Which MLflow runs a comparison takes: run ids, tags, filters; never earlier comparisons."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from taskcodec import model_registry
from taskcodec.errors import ConfigError

# Older MLflow servers refuse tag values over 5000 characters (8000 since 2.x): stay below both.
MAX_TAG_CHARS = 5000
MAX_RUNS = 10_000


def _quote(value: str) -> str:
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ConfigError(f"tag value {value!r} holds both quote characters; use --filter instead")


def tag_filter(tags: Mapping[str, str]) -> str:
    """MLflow search clauses for exact tag values (keys in backticks, so any key is allowed)."""
    return " and ".join(f"tags.`{k}` = {_quote(v)}" for k, v in tags.items())


def _join(*clauses: str) -> str:
    return " and ".join(c for c in clauses if c.strip())


def _search(client, experiment_ids: list[str], filter_string: str) -> list:
    runs, token = [], None
    while True:
        try:
            page = client.search_runs(experiment_ids, filter_string, max_results=1000,
                                      page_token=token)
        except Exception as err:  # MlflowException for a bad filter, network errors
            raise ConfigError(f"MLflow search {filter_string!r} failed: "
                              f"{str(err).splitlines()[0][:300]}") from None
        runs.extend(page)
        token = page.token
        if not token or len(runs) >= MAX_RUNS:
            return runs


def select_runs(client, *, experiment_ids: Sequence[str] = (), filter_string: str = "",
                run_ids: Sequence[str] = (), tags: Mapping[str, str] | None = None) -> list:
    """The runs to compare, without earlier comparison runs.

    Explicit ``run_ids`` win; otherwise the experiments are searched with ``filter_string`` and
    the tag conditions. Unless the filter already speaks of ``entry_point``, evaluate runs are
    taken when there are any (training runs log validation metrics, not real-bitstream bpp).
    """
    tags = dict(tags or {})
    if run_ids:
        runs = []
        for run_id in run_ids:
            if model_registry.is_model_uri(run_id):  # a registered model: its evaluate runs
                runs += [r for r in model_registry.evaluated_by(run_id, client)
                         if all(r.data.tags.get(k) == v for k, v in tags.items())]
                continue
            try:
                run = client.get_run(run_id)
            except Exception as err:
                raise ConfigError(f"no MLflow run {run_id!r} at {client.tracking_uri}: "
                                  f"{str(err).splitlines()[0][:200]}") from None
            if all(run.data.tags.get(k) == v for k, v in tags.items()):
                runs.append(run)
        runs = list({r.info.run_id: r for r in runs}.values())  # a run named twice counts once
    else:
        base = _join(filter_string, tag_filter(tags))
        runs = []
        if "entry_point" not in filter_string:
            runs = _search(client, list(experiment_ids),
                           _join(base, "tags.entry_point = 'evaluate'"))
        if not runs:
            runs = _search(client, list(experiment_ids), base)
    return [r for r in runs if r.data.tags.get("comparison") != "true"]


def run_ids_tag(run_ids: Sequence[str], limit: int = MAX_TAG_CHARS) -> str:
    """Comma list of run ids that fits a tag; when cut, it ends with how many were left out."""
    text = ",".join(run_ids)
    if len(text) <= limit:
        return text

    def cut(kept: list[str]) -> str:
        return ",".join([*kept, f"...(+{len(run_ids) - len(kept)} more; see compared_runs.json)"])

    kept: list[str] = []
    for run_id in run_ids:
        if len(cut([*kept, run_id])) > limit:
            break
        kept.append(run_id)
    return cut(kept)


