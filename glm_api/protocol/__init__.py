"""Wire models only (pydantic); no torch imports here."""
