"""Data prep: the sample manifest schema (`manifest`); the face index, identities and samples."""
