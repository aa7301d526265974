"""Dask pipelines composing library steps (installed as ``wsiuda.pipelines``)."""
