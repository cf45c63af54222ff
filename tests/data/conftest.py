"""Fixtures for the loader tests: tiny MovieLens-shaped folders and the real data location."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

ML1M_MOVIES = (
    "1::Toy Story (1995)::Animation|Children's|Comedy\n"
    "2::Misérables, Les (1995)::Drama|Musical\n"
    "1001::Associate, The (L'Associe)(1982)::Comedy\n"
    "3::Untitled::Documentary\n"
)
ML1M_USERS = "1::F::1::10::48067\n2::M::56::16::70072\n3::M::25::15::V5A 1A1\n"
ML1M_RATINGS = (
    "1::1::5::978300760\n"
    "1::1001::3::978302109\n"
    "2::2::4::978301968\n"
    "3::1::1::978300275\n"
)

ML100K_GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance",
    "Sci-Fi", "Thriller", "War", "Western",
]


def _flags(*names: str) -> str:
    return "|".join("1" if g in names else "0" for g in ML100K_GENRES)


ML100K_ITEMS = (
    f"1|Toy Story (1995)|01-Jan-1995||http://x/1|{_flags('Animation', 'Comedy')}\n"
    f"2|Misérables, Les (1995)|01-Jan-1995||http://x/2|{_flags('Drama')}\n"
    f"3|unknown||||{_flags('unknown')}\n"
)
ML100K_USERS = "1|24|M|technician|85711\n2|53|F|other|94043\n3|17|M|student|T8H1N\n"
ML100K_DATA = "1\t1\t5\t874965758\n2\t2\t3\t876893171\n3\t3\t4\t878542960\n1\t2\t1\t876893119\n"


def write_ml1m(root: Path, ratings_name: str = "ratings.dat") -> Path:
    """A four-movie ML-1M folder (movies.dat in latin-1, like the real one)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "movies.dat").write_bytes(ML1M_MOVIES.encode("latin-1"))
    (root / "users.dat").write_text(ML1M_USERS)
    write_text(root / ratings_name, ML1M_RATINGS)
    return root


def write_ml100k(root: Path, data_name: str = "u.data") -> Path:
    """A three-movie ML-100K folder."""
    root.mkdir(parents=True, exist_ok=True)
    genre = "".join(f"{g}|{i}\n" for i, g in enumerate(ML100K_GENRES)) + "\n"
    (root / "u.genre").write_text(genre)
    (root / "u.item").write_bytes(ML100K_ITEMS.encode("latin-1"))
    (root / "u.user").write_text(ML100K_USERS)
    write_text(root / data_name, ML100K_DATA)
    return root


def write_text(path: Path, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text``, gzipped when the name ends in .gz."""
    import gzip

    data = text.encode(encoding)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


class Writers:
    """The writers above, handed to tests through the ``writers`` fixture."""

    ml1m = staticmethod(write_ml1m)
    ml100k = staticmethod(write_ml100k)
    text = staticmethod(write_text)


@pytest.fixture
def writers() -> type[Writers]:
    return Writers


@pytest.fixture
def ml1m_dir(tmp_path: Path) -> Path:
    return write_ml1m(tmp_path / "ml-1m")


@pytest.fixture
def ml100k_dir(tmp_path: Path) -> Path:
    return write_ml100k(tmp_path / "ml-100k")


@pytest.fixture
def shared_data() -> Path:
    """The folder with the real datasets (``$BSTREC_DATA_DIR`` or ``<repo>/../shared/data``)."""
    return Path(os.environ.get("BSTREC_DATA_DIR", REPO.parent / "shared" / "data"))


def _require(folder: Path, what: str, name: str) -> Path:
    from bstrec.data.movielens import has_movielens

    if not has_movielens(name, folder):
        pytest.skip(f"{what} not found in {folder} (set BSTREC_DATA_DIR)")
    return folder


@pytest.fixture
def real_ml1m(shared_data: Path) -> Path:
    """The real ML-1M folder, or skip."""
    return _require(shared_data / "ml-1m", "ML-1M", "ml-1m")


@pytest.fixture
def real_ml100k(shared_data: Path) -> Path:
    """The real ML-100K folder, or skip."""
    return _require(shared_data / "ml-100k", "ML-100K", "ml-100k")
