//! The protobuf codec of every generated client and server: prost's, except that a request the
//! server cannot decode is the caller's fault and answers `INVALID_ARGUMENT` naming the field
//! (e.g. a key that is not UTF-8: "RecordHitRequest.key: invalid string value: data is not UTF-8
//! encoded"), where prost's codec answers `INTERNAL`, which tells the caller to look at the server.
//!
//! A codec does not know whether it runs in a client or a server; it knows the type it decodes.
//! Servers decode requests and clients decode responses, and every message a server of ours
//! decodes is named `…Request` (a test below holds every service to that), so the decoder tells
//! the two apart by the message's name. A client that cannot decode a response keeps `INTERNAL`.

use std::marker::PhantomData;

use prost::Message;
use tonic::{
    codec::{BufferSettings, Codec, DecodeBuf, Decoder},
    Status,
};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// prost's codec with request decoding errors answered as `INVALID_ARGUMENT` (see the module).
#[derive(Debug, Clone)]
pub struct ContractCodec<T, U>(ProstCodec<T, U>);

impl<T, U> Default for ContractCodec<T, U> {
    fn default() -> Self {
        Self(ProstCodec::default())
    }
}

impl<T, U> Codec for ContractCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ContractDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        ContractDecoder {
            inner: self.0.decoder(),
            _message: PhantomData,
        }
    }
}

/// The decoder of [`ContractCodec`].
#[derive(Debug)]
pub struct ContractDecoder<U> {
    inner: ProstDecoder<U>,
    _message: PhantomData<fn() -> U>,
}

/// Whether `U` is a request message (decoded by a server), by the naming rule of our protos.
fn is_request<U>() -> bool {
    std::any::type_name::<U>().ends_with("Request")
}

impl<U: Message + Default> Decoder for ContractDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.inner.decode(buf).map_err(|status| {
            if is_request::<U>() && status.code() == tonic::Code::Internal {
                Status::invalid_argument(format!("malformed request: {}", status.message()))
            } else {
                status
            }
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.inner.buffer_settings()
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;
    use prost_types::FileDescriptorSet;

    use super::is_request;
    use crate::{aggregator, v1, FILE_DESCRIPTOR_SET};

    #[test]
    fn every_message_a_server_decodes_is_named_request() -> Result<(), prost::DecodeError> {
        let set = FileDescriptorSet::decode(FILE_DESCRIPTOR_SET)?;
        let mut inputs = 0;
        for file in &set.file {
            for service in &file.service {
                for method in &service.method {
                    inputs += 1;
                    assert!(
                        method.input_type().ends_with("Request"),
                        "{}.{} takes {}: name request messages …Request",
                        service.name(),
                        method.name(),
                        method.input_type()
                    );
                    assert!(
                        !method.output_type().ends_with("Request"),
                        "{}.{} returns {}",
                        service.name(),
                        method.name(),
                        method.output_type()
                    );
                }
            }
        }
        assert!(inputs >= 10, "{inputs} methods");
        assert!(is_request::<v1::RecordHitsRequest>());
        assert!(is_request::<aggregator::v1::ApplyRequest>());
        assert!(!is_request::<v1::GetHitsResponse>());
        Ok(())
    }
}
