"""Device mesh and sharding.

  distributed  multi-process start-up per platform (maybe_initialize_distributed), coordination-service barriers
  mesh         ('data', 'fsdp') mesh from config.mesh
  sharding     logical axis rules -> NamedShardings, sharded init, batch sharding, sharding checks
"""
