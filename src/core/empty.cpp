// Placeholder translation unit for a stage library that has no sources yet.
