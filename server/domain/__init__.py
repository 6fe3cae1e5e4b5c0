"""The registry's rules: lifecycle, validation, the mutation engine, the stage hub, the ports.

The domain speaks the API's request and response messages (``modelreg.v1``), as etcd's server
speaks ``pb.PutRequest``: the proto *is* the domain's vocabulary, so a new RPC costs a rule and a
one-line handler, not a mapping layer. Do not add one.
"""
