"""Evaluation runners: retrievers and Open-QA models over question sets (metrics in
:mod:`realm.metrics`)."""
