"""LUNA16 on disk, synthetic scans, patches, the patch cache, sites, loaders."""
