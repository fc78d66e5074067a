"""Offline data preparation: raw DICOM and photo corpora to de-identified, patient-split shards."""
