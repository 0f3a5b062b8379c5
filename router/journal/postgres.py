from router.journal.base import Journal as PostgresJournal  # noqa: F401  (placeholder)
