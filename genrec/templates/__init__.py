"""The template subsystem: parsing and rendering (prompts), the bounded Jinja sandbox, the
versioned store of a run's templates (prompt_store); the shipped templates are package data in builtin/."""
