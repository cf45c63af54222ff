"""The dataset registry the CLI uses: one name -> one loader.

File-backed datasets live in ``<data_dir>/<name>/`` (ml-1m, ml-100k, taobao, amazon); ``csv``
and ``parquet`` read ``input_path`` through a :class:`ColumnMapping`; ``synthetic-order`` (P4),
``synthetic-implicit`` (P5, a large long-tailed catalogue) and ``synthetic-taobao`` (P5 in
Taobao's format: pv/cart/fav/buy, item prices) are generated. ``data_dir``
defaults to the environment variable ``BSTREC_DATA_DIR``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from bstrec.data.amazon import find_amazon, load_amazon
from bstrec.data.movielens import has_movielens, load_ml1m, load_ml100k
from bstrec.data.schema import Dataset
from bstrec.data.tabular import ColumnMapping, Format, load_table
from bstrec.data.taobao import find_taobao, load_taobao

DATASETS = ("ml-1m", "ml-100k", "taobao", "amazon", "synthetic-order", "synthetic-implicit",
            "synthetic-taobao", "csv", "parquet")
GENERATED = ("synthetic-order", "synthetic-implicit", "synthetic-taobao")
FOLDER_DATASETS = ("ml-1m", "ml-100k", "taobao", "amazon")
ENV_DATA_DIR = "BSTREC_DATA_DIR"
# Keyword options each loader accepts beyond strict (anything else is a typo, and an error).
_OPTIONS: dict[str, tuple[str, ...]] = {
    "ml-1m": (), "ml-100k": (), "amazon": (), "taobao": ("max_rows",),
    "csv": ("separator", "has_header", "feedback", "timestamp_format"),
    "parquet": ("feedback", "timestamp_format"),
}


def resolve_data_dir(data_dir: Path | None) -> Path | None:
    """``data_dir`` if given, else ``$BSTREC_DATA_DIR``, else None."""
    if data_dir is not None:
        return Path(data_dir)
    env = os.environ.get(ENV_DATA_DIR)
    return Path(env) if env else None


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")


def available(name: str, data_dir: Path | None, input_path: Path | None = None) -> bool:
    """Whether the files of dataset ``name`` are present (generated datasets: always)."""
    _check_name(name)
    if name in GENERATED:
        return True
    if name in ("csv", "parquet"):
        return input_path is not None and Path(input_path).is_file()
    root = resolve_data_dir(data_dir)
    if root is None or not (root / name).is_dir():
        return False
    folder = root / name
    try:
        if name in ("ml-1m", "ml-100k"):
            return has_movielens(name, folder)
        if name == "taobao":
            find_taobao(folder)
        else:
            find_amazon(folder)
    except FileNotFoundError:
        return False
    return True


def _folder(name: str, data_dir: Path | None) -> Path:
    root = resolve_data_dir(data_dir)
    hint = (f"; run `bstrec data download {name}`" if name in ("ml-1m", "ml-100k") else "")
    if root is None:
        raise FileNotFoundError(
            f"{name}: no data folder given; pass --data-dir or set {ENV_DATA_DIR} to the folder "
            f"that holds {name}/{hint}")
    folder = root / name
    if not folder.is_dir():
        raise FileNotFoundError(f"{name}: expected the folder {folder}{hint}")
    return folder


def load_dataset(
    name: str,
    data_dir: Path | None,
    *,
    strict: bool = True,
    input_path: Path | None = None,
    mapping: ColumnMapping | None = None,
    **options: Any,
) -> Dataset:
    """Load dataset ``name`` in the canonical schema.

    ``options`` go to the loader (taobao: ``max_rows``; csv/parquet: ``separator``,
    ``has_header``, ``feedback``, ``timestamp_format``; synthetic-order: the fields of
    ``SyntheticConfig``; synthetic-implicit: those of ``ImplicitConfig``; synthetic-taobao:
    those of ``TaobaoConfig``). Unknown options are errors.
    """
    _check_name(name)
    if name == "synthetic-order":
        # Imported here: the generator is optional for every other dataset.
        from bstrec.data import synthetic

        return synthetic.generate(synthetic.SyntheticConfig(**options))
    if name == "synthetic-implicit":
        from bstrec.config import from_dict
        from bstrec.data import synthetic

        return synthetic.generate_implicit(
            from_dict(synthetic.ImplicitConfig, options, where="synthetic-implicit"))
    if name == "synthetic-taobao":
        from bstrec.config import from_dict
        from bstrec.data import synthetic

        return synthetic.generate_taobao(
            from_dict(synthetic.TaobaoConfig, options, where="synthetic-taobao"))
    unknown = sorted(set(options) - set(_OPTIONS[name]))
    if unknown:
        allowed = ", ".join(_OPTIONS[name]) or "none"
        raise ValueError(f"{name}: unknown options {', '.join(unknown)} (allowed: {allowed})")
    if name in ("csv", "parquet"):
        if input_path is None or mapping is None:
            raise ValueError(f"{name}: needs input_path and a column mapping "
                             "(user_id=..., item_id=..., timestamp=...)")
        if not Path(input_path).is_file():
            raise FileNotFoundError(f"{name}: no such file {input_path}")
        fmt: Format = "csv" if name == "csv" else "parquet"
        return load_table(Path(input_path), mapping, fmt=fmt, strict=strict, **options)
    folder = _folder(name, data_dir)
    if name == "ml-1m":
        return load_ml1m(folder, strict=strict)
    if name == "ml-100k":
        return load_ml100k(folder, strict=strict)
    if name == "taobao":
        return load_taobao(folder, strict=strict, **options)
    return load_amazon(folder, strict=strict)
