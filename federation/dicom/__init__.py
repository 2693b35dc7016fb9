"""DICOM at the site: reading series with their labels, and the synthetic consortium."""
