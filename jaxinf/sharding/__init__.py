"""The ground under the method: the logical axes every array declares where it is made (``axes``), the rules
that map them onto a mesh (``partitioning``) and the meshes and processes themselves (``meshes``). Imports only
:mod:`jaxinf.errors`; docs/architecture.md has the layers."""
