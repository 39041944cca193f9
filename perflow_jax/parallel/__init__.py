"""Device mesh and sharding.

  mesh      ('data', 'fsdp') mesh from config.mesh; multi-process start-up (maybe_initialize_distributed)
  sharding  logical axis rules -> NamedShardings, sharded init, batch sharding, sharding checks
"""
