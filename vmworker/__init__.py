"""vmworker: a per-host worker that runs QEMU/KVM virtual machines for a master.

See DESIGN.md in the shared folder for the contract; ``app.build`` shows how
the modules fit together.
"""
