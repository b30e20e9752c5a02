"""Pipeline ``ais_prognosis_mri``: poor outcome (mRS 3-6) after stroke from an MRI study."""
