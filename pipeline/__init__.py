"""The planning pipeline: calibrate (imatrix) → sensitivity tables → allocate → plan.json."""
