"""Offline data preparation: raw DICOM and photo corpora to de-identified, patient-split shards.

The driver is `pipeline` (`check_prep`, `run_prep`); its pieces: `job`, `discover`, `convert`,
`instances`, `chunks`, `markers`, `plan`, `merge`; pixels (`dicom`, `photos`), identity (`deid`),
labels and splits (`labels`, `splits`), burned-in text (`redact`, `redact_rules`, `regions`, `ocr`).
"""
