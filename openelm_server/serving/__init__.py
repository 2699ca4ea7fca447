"""HTTP: one file per API, schemas, errors and middleware. Knows nothing of tensors."""
