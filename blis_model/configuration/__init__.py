"""Configuration: what an experiment ran (server knobs, model architecture, GPU), read from
its files and the bundled catalogs, plus the project's shared defaults (``defaults``)."""
