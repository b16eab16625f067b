//! Between ndarray arrays (the core's) and burn tensors, in f32.

use burn::prelude::*;
use ndarray::{Array, Array1, Array2, Dimension, IxDyn};

/// An f32 array of any rank as a tensor of rank `D` on `device`.
///
/// # Panics
///
/// If the array's rank is not `D`.
///
/// # Examples
///
/// ```
/// use burn::prelude::*;
/// let t: Tensor<2> = mhc_burn::tensor_from_array(&ndarray::array![[1.0f32, 2.0]], &Device::flex());
/// assert_eq!(t.dims(), [1, 2]);
/// ```
pub fn tensor_from_array<const D: usize, S: Dimension>(
    a: &Array<f32, S>,
    device: &Device,
) -> Tensor<D> {
    assert_eq!(
        a.ndim(),
        D,
        "array of rank {} as a tensor of rank {D}",
        a.ndim()
    );
    let data = TensorData::new(a.iter().copied().collect::<Vec<f32>>(), a.shape().to_vec());
    Tensor::from_data(data, device)
}

/// A tensor's values as an f32 array of the same shape (read back from the device).
///
/// # Examples
///
/// ```
/// use burn::prelude::*;
/// let t = Tensor::<2>::ones([2, 3], &Device::flex());
/// assert_eq!(mhc_burn::array_from_tensor(&t).shape(), &[2, 3]);
/// ```
pub fn array_from_tensor<const D: usize>(t: &Tensor<D>) -> Array<f32, IxDyn> {
    let data = t.to_data().convert::<f32>();
    let v: Vec<f32> = data.try_to_vec().expect("converted to f32");
    Array::from_shape_vec(IxDyn(&t.dims()), v).expect("the tensor's shape")
}

pub(crate) fn tensor1(a: &Array1<f32>, device: &Device) -> Tensor<1> {
    tensor_from_array(a, device)
}

pub(crate) fn tensor2(a: &Array2<f32>, device: &Device) -> Tensor<2> {
    tensor_from_array(a, device)
}

pub(crate) fn array1(t: &Tensor<1>) -> Array1<f32> {
    array_from_tensor(t).into_dimensionality().expect("rank 1")
}

pub(crate) fn array2(t: &Tensor<2>) -> Array2<f32> {
    array_from_tensor(t).into_dimensionality().expect("rank 2")
}
