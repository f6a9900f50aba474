"""The emperor: watches vassal dirs and supervises one vassal per file."""
