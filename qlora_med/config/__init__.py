"""The recipe: what it may say (schema, stages), how it is read (loader), whether its files exist (files)."""
