"""Where a study lives: the Optuna storages (SQLite, PostgreSQL / MySQL, a journal file).

A study lives in an Optuna storage: by default the SQLite file
`Experiments/Exp_{exp}/{dataset}/optuna.db`; any Optuna RDB URL
(postgresql://, mysql://, sqlite://) or `journal:PATH` (a journal file on a
shared disk) lets several processes on several machines run one study at
once (`Pipeline.tuning.study.run_study`, `Pipeline.tuning.workers`). Every
failure to open one is a one-line UserError, with any password hidden, and a
database server that does not answer fails within CONNECT_TIMEOUT_S.

Example:
    >>> storage = open_storage(default_storage_url("0", "digits"), create_folder=True)
    >>> storage = open_storage("journal:/shared/studies/optuna.log")
"""

import time
import warnings
from pathlib import Path

import optuna

from Pipeline.tuning.workers import GRACE_PERIOD_S, HEARTBEAT_INTERVAL_S
from Utils.cli import UserError
from Utils.paths import experiment_dir

STORAGE_FILE = "optuna.db"
# A database server that does not answer within this is reported instead of waited on.
CONNECT_TIMEOUT_S = 10


def default_storage_path(exp, dataset):
    """Experiments/Exp_{exp}/{dataset}/optuna.db."""
    return experiment_dir(exp, dataset) / STORAGE_FILE


def default_storage_url(exp, dataset):
    """The SQLite file in the experiment folder, as an absolute sqlite:/// URL."""
    return f"sqlite:///{default_storage_path(exp, dataset).resolve()}"


def redact(url):
    """The URL with any password hidden, for messages."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not an RDB URL (journal:...) or unparsable: nothing to hide we can find
        return url


def open_storage(url, create_folder=False):
    """An Optuna storage for `url`; any failure is a one-line UserError.

    url: an RDB URL (sqlite:///path.db, postgresql://... through psycopg 3, mysql://...),
    or `journal:PATH` for a journal file on a shared disk (O_EXCL lock files). A
    server that does not answer fails within CONNECT_TIMEOUT_S.
    create_folder: create a sqlite file's folder (the default storage's experiment folder);
    otherwise a missing folder is an error, not a silently created tree.
    """
    url = str(url).strip()
    try:
        if url.startswith("journal:"):
            path = Path(url[len("journal:"):]).expanduser()
            if not url[len("journal:"):].strip():
                raise UserError("--storage journal: needs a file, e.g. journal:/shared/studies/optuna.log")
            if not path.parent.is_dir():
                raise UserError(f"cannot open the Optuna journal {path}: folder {path.parent} does not exist")
            if path.exists() and not path.is_file():
                raise UserError(f"cannot open the Optuna journal {path}: it is not a file")
            from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock, JournalStorage

            # O_EXCL lock files work on NFS v3+ and local disks alike, where symlink locks need NFS v2 semantics.
            return JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))
        if "://" not in url:
            raise UserError(f"--storage {url!r} is not a storage URL: use sqlite:///PATH.db, "
                            "postgresql://..., mysql://... or journal:PATH")
        if url.startswith("sqlite:///"):
            folder = Path(url[len("sqlite:///"):]).parent
            if create_folder:
                folder.mkdir(parents=True, exist_ok=True)
            elif not folder.is_dir():
                raise UserError(f"cannot open the Optuna storage {url}: folder {folder} does not exist")
        if url.startswith("sqlite"):
            engine_kwargs = {"connect_args": {"timeout": 60}}  # seconds to wait for another writer's lock
        elif url.startswith(("postgresql", "mysql", "mariadb")):
            engine_kwargs = {"connect_args": {"connect_timeout": CONNECT_TIMEOUT_S}}
        else:
            engine_kwargs = None
        return _open_rdb_storage(url, engine_kwargs)
    except UserError:
        raise
    except Exception as e:  # SQLAlchemy/driver errors: unknown dialect, missing driver, refused connection
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot open the Optuna storage {redact(url)}: {reason}") from None


def _open_rdb_storage(url, engine_kwargs, attempts=5):
    """RDBStorage(url), retried when workers starting together race to create its tables.

    Optuna creates the schema when it finds none; on a new database two workers
    doing so at once make one fail ("already exists"), and a moment later the
    tables are there. Connection errors are not retried: they fail at once.
    """
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    for attempt in range(attempts):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs,
                                                  heartbeat_interval=HEARTBEAT_INTERVAL_S,
                                                  grace_period=GRACE_PERIOD_S)
        except (IntegrityError, ProgrammingError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.5 * (attempt + 1))

