"""What docker/entrypoint.py runs, by job: the settings and the checks before any start
(:mod:`.settings`), the server's roles (:mod:`.server`) and a hospital's (:mod:`.hospital`).
Standard library only (``prepare`` and ``LUNAFL_PIN`` also import the project)."""
