"""Reading a sweep's store from outside while a subprocess writes it, shared by the tests."""
import sqlite3


def estimate_count(store) -> int:
    """Rows in the store's ``estimates`` table, 0 while the file or table does not exist yet."""
    try:
        con = sqlite3.connect(store, timeout=5)
        try:
            return con.execute("SELECT COUNT(*) FROM estimates").fetchone()[0]
        finally:
            con.close()
    except sqlite3.OperationalError:  # not created yet
        return 0
