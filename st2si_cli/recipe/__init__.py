"""The recipe `st2si adapt --domain D` trains by default: ID-only sequence adapters, the swept ILP and
their fusion, chosen on validation, within a time budget (`run.py`), with settings that follow from the
data (`settings.py`)."""
