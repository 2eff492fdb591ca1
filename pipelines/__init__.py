"""mumic's pipelines, one room per job: retag, train, evaluation, registry, quickstart; and the shared
layers storage, tables, annotations, progress and cluster. See docs/architecture.md."""
