"""Platform code for isolating and tracking vassals (cgroups, namespaces, jails)."""
