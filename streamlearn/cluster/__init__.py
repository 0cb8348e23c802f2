"""Several replicas of one service, one model: parameters averaged over torch.distributed (issue 19, in progress).

`wire` turns a replica's `ParameterSet`s into bytes and back (msgpack of plain arrays: nothing is unpickled);
`group` averages them across the replicas of a process group (`ReplicaGroup.average`).
"""
