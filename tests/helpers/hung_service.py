"""A service that says Hello and Ready, then hangs: no heartbeats, no reads."""

import os
import time

import zmq

from protocols import Codec, Header, Hello, Kind, Ready
from services import read_credential

codec = Codec()
sock = zmq.Context.instance().socket(zmq.DEALER)
sock.connect(os.environ["EDGEBUS_BUS"])
sock.send_multipart(codec.pack(Header(kind=Kind.CONTROL, type="Hello", id=1),
                               Hello(service=os.environ["EDGEBUS_SERVICE"], credential=read_credential())))
sock.recv_multipart()
sock.send_multipart(codec.pack(Header(kind=Kind.CONTROL, type="Ready"), Ready()))
while True:
    time.sleep(3600)
