from router.journal.base import Journal as PostgresJournal  # placeholder
